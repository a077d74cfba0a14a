"""A surgery plan: which attention variant, with which settings, on each self-attention layer.

Shaped like torchao's `FqnToConfig`: an ordered map from a module name (`blocks.N.attn1`) to a
variant config, plus the model fingerprint it was made for and, when a planner made it, the grid,
budget and measured errors. JSON on disk; variant names, never import paths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PlanError, SurgeryError
from .grid import VideoGrid
from .io import atomic_write_json
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

    @classmethod
    def uniform(cls, model_spec: str, config: dict, variant: str, params: dict | None = None) -> "Plan":
        """The same variant on every self-attention layer."""
        layer_config = get_variant(variant).Config.from_dict(params or {}, where=variant)
        fqns = self_attention_fqns(config["num_layers"])
        return cls(model_spec, fingerprint(config), len(fqns), {f: LayerChoice(variant, layer_config) for f in fqns})

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "model": {"id": self.model, "fingerprint": self.fingerprint, "num_layers": self.num_layers},
            "grid": self.grid.to_dict() if self.grid else None,
            "budget": self.budget,
            **self.meta,
            "layers": {fqn: choice.to_dict() for fqn, choice in self.layers.items()},
        }

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
            meta = {k: v for k, v in d.items() if k not in ("version", "model", "grid", "budget", "layers")}
            return cls(model["id"], model["fingerprint"], int(model["num_layers"]), layers, grid, d.get("budget"), meta)
        except PlanError:
            raise
        except SurgeryError as e:
            raise PlanError(str(e)) from None
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise PlanError(f"malformed plan: missing or bad field {e}") from None

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist") from None
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"cannot read plan {path}: {e}") from None
        return cls.from_dict(data)
