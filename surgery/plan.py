"""A surgery plan: which attention variant, with which settings, on each self-attention layer.

Shaped like torchao's `FqnToConfig`: an ordered map from a module name (`blocks.N.attn1`) to a
variant config, plus the model fingerprint it was made for and, when a planner made it, the grid,
budget and measured errors. JSON on disk; variant names, never import paths.

A plan may keep the model's own dense attention for the first, highest-noise sampling steps
(`dense_boundary`: every timestep ≥ dense_boundary·1000, as Wan2.2 switches experts at its boundary ratio), where a
student's errors move a video's layout for good; its budget then counts those steps as dense.

A plan whose errors were measured after stage 1 also carries the chosen layers' trained attention
weights (`stage1`), which `distill` starts from: on disk a safetensors file beside the JSON
(`plan.json` → `plan.stage1.safetensors`), named in the JSON with its SHA-256 so that a missing,
damaged or foreign file is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PlanError, SurgeryError
from .grid import VideoGrid
from .io import atomic_write_bytes, atomic_write_json
from .variants import VariantConfig, get_variant
from .wan import fingerprint, self_attention_fqns

PLAN_VERSION = 1


@dataclass(frozen=True)
class LayerChoice:
    variant: str
    config: VariantConfig
    flops: float | None = None  # cost model at the plan's grid
    error: float | None = None  # measured relative L2 error against full attention

    def to_dict(self) -> dict[str, Any]:
        d = {"variant": self.variant, "params": self.config.to_dict()}
        if self.flops is not None:
            d["flops"] = self.flops
        if self.error is not None:
            d["error"] = self.error
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "LayerChoice":
        if not isinstance(d, dict) or "variant" not in d:
            raise PlanError(f"{where}: expected an object with a 'variant' field")
        variant = get_variant(d["variant"])
        config = variant.Config.from_dict(d.get("params") or {}, where=f"{where}.params")
        return cls(d["variant"], config, d.get("flops"), d.get("error"))


@dataclass
class Plan:
    model: str  # the model spec the plan was made on (informational)
    fingerprint: str  # of the model's architecture config; apply() refuses any other model
    num_layers: int
    layers: dict[str, LayerChoice]
    grid: VideoGrid | None = None
    budget: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # planner's report: flops ratio, solver, gap
    # Timesteps ≥ dense_boundary·1000 run every layer's dense attention (surgery.grid.ForwardContext); None: none do.
    dense_boundary: float | None = None
    # Trained attention weights of the chosen layers (student parameter names, "blocks.N.attn1.processor.…").
    stage1: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def uniform(cls, model_spec: str, config: dict, variant: str, params: dict | None = None) -> "Plan":
        """The same variant on every self-attention layer."""
        layer_config = get_variant(variant).Config.from_dict(params or {}, where=variant)
        fqns = self_attention_fqns(config["num_layers"])
        return cls(model_spec, fingerprint(config), len(fqns), {f: LayerChoice(variant, layer_config) for f in fqns})

    def to_dict(self) -> dict[str, Any]:
        stage1 = {"stage1_weights": {"tensors": len(self.stage1), "sha256": _sha256(self._stage1_bytes())}} \
            if self.stage1 else {}
        return {
            "version": PLAN_VERSION,
            "model": {"id": self.model, "fingerprint": self.fingerprint, "num_layers": self.num_layers},
            "grid": self.grid.to_dict() if self.grid else None,
            "budget": self.budget,
            **self.meta,
            **stage1,
            **({"dense_boundary": self.dense_boundary} if self.dense_boundary is not None else {}),
            "layers": {fqn: choice.to_dict() for fqn, choice in self.layers.items()},
        }

    def _stage1_bytes(self) -> bytes:
        from safetensors.torch import save

        return save({k: v.detach().cpu().contiguous() for k, v in sorted(self.stage1.items())})

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict):
            raise PlanError("a plan must be a JSON object")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"plan version {d.get('version')!r} is not supported (expected {PLAN_VERSION})")
        try:
            model = d["model"]
            layers = {fqn: LayerChoice.from_dict(c, f"layers.{fqn}") for fqn, c in d["layers"].items()}
            grid = VideoGrid.from_dict(d["grid"]) if d.get("grid") else None
            # stage1_weights describes the file beside a saved plan: `load` reads it, a bare dict has none.
            meta = {k: v for k, v in d.items()
                    if k not in ("version", "model", "grid", "budget", "layers", "stage1_weights", "dense_boundary")}
            boundary = d.get("dense_boundary")
            if boundary is not None and not (isinstance(boundary, (int, float)) and 0 < boundary <= 1):
                raise PlanError(f"dense_boundary must be a timestep ratio in (0, 1], got {boundary!r}")
            return cls(model["id"], model["fingerprint"], int(model["num_layers"]), layers, grid, d.get("budget"), meta,
                       dense_boundary=boundary)
        except PlanError:
            raise
        except SurgeryError as e:
            raise PlanError(str(e)) from None
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise PlanError(f"malformed plan: missing or bad field {e}") from None

    def save(self, path: str | Path) -> Path:
        """The JSON at `path`; with stage-1 weights, first their file beside it (`stage1_weights_path`)."""
        if self.stage1:
            atomic_write_bytes(stage1_weights_path(path), self._stage1_bytes())
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, stage1_weights: bool = True) -> "Plan":
        """A saved plan; with `stage1_weights`, also the stage-1 weights its JSON names, checked against
        their SHA-256 (a missing or mismatched file is a PlanError)."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist") from None
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"cannot read plan {path}: {e}") from None
        plan = cls.from_dict(data)
        expected = data.get("stage1_weights") if isinstance(data, dict) else None
        if stage1_weights and expected:
            plan.stage1 = _read_stage1(stage1_weights_path(path), expected, path)
        return plan


def stage1_weights_path(plan_path: str | Path) -> Path:
    """Where a plan's stage-1 weights live: beside its JSON, `plan.json` → `plan.stage1.safetensors`."""
    plan_path = Path(plan_path)
    return plan_path.with_name(f"{plan_path.stem}.stage1.safetensors")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_stage1(path: Path, expected: dict, plan_path) -> dict:
    from safetensors.torch import load

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PlanError(f"plan {plan_path} names stage-1 weights {path.name} beside it, and there is none") from None
    except OSError as e:
        raise PlanError(f"cannot read {path}: {e}") from None
    if not isinstance(expected, dict) or _sha256(data) != expected.get("sha256"):
        raise PlanError(f"{path} is not the stage-1 weights plan {plan_path} was saved with (damaged or replaced)")
    return load(data)
