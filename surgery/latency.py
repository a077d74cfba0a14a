"""The latency cost model: each candidate's attention timed on this GPU at the target grid, and the model's
step with and without its attention core, so a plan can be held to a step time (Amdahl: the part of the
step that is not attention stays). The step can be timed compiled; each attention call is timed as it is
(its kernels), which compilation barely changes.

Timings are cached as JSON under the user's cache directory ($VSURGERY_CACHE, else $XDG_CACHE_HOME/vsurgery,
else ~/.cache/vsurgery), one file per (GPU, torch, triton, grid, heads × head_dim, dtype, inference or
training, and for steps eager or compiled): planning again on the same machine times nothing twice. A corrupt
file is ignored with a warning and measured again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from .errors import SurgeryError
from .grid import VideoGrid
from .io import atomic_write_json
from .timing import attention_core_skipped, blocks_compiled, median_ms, warmup_calls
from .variants import VARIANTS, VariantConfig
from .wan import input_dtype

MODES = ("inference", "training")


def cache_dir() -> Path:
    if os.environ.get("VSURGERY_CACHE"):
        return Path(os.environ["VSURGERY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vsurgery"


def require_gpu() -> torch.device:
    if not torch.cuda.is_available():
        raise SurgeryError("--cost latency times attention on a CUDA GPU, and this machine has none; "
                           "plan by FLOPs (the default) here")
    return torch.device("cuda")


def machine_facts() -> dict:
    """What decides a timing besides the work: the GPU and the software that drives it."""
    import triton

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}


class TimingCache:
    """One JSON file of timings (ms by label) for everything that decides them but the labels (`facts`)."""

    def __init__(self, kind: str, **facts):
        self.facts = {"kind": kind, **facts}
        digest = hashlib.sha256(json.dumps(self.facts, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.path = cache_dir() / "latency" / f"{kind}-{digest}.json"
        self.timings: dict[str, float] = self._read()

    def _read(self) -> dict[str, float]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            timings = data["timings"]
            if data["facts"] != json.loads(json.dumps(self.facts, default=str)) or not all(
                    isinstance(v, (int, float)) for v in timings.values()):
                raise ValueError("its contents do not match its name")
            return {str(k): float(v) for k, v in timings.items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"ignoring the unreadable latency cache {self.path} ({e}); measuring again", stacklevel=2)
            return {}

    def get_or_time(self, label: str, measure) -> float:
        if label not in self.timings:
            self.timings[label] = float(measure())
            atomic_write_json(self.path, {"facts": self.facts, "timings": self.timings})
        return self.timings[label]


def candidate_label(variant: str, config: VariantConfig) -> str:
    return f"{variant} {json.dumps(config.to_dict(), sort_keys=True)}"


def attention_latency(candidates: list[tuple[str, VariantConfig]], grid: VideoGrid, heads: int, head_dim: int, *,
                      dtype: torch.dtype = torch.bfloat16, mode: str = "inference", repeats: int = 10,
                      progress=None) -> dict[str, float]:
    """Median ms of one self-attention call (batch 1) of each (variant, config) at `grid`, on random q, k, v:
    the forward under no_grad, or with mode="training" forward + backward. Keys: `candidate_label`."""
    device = require_gpu()
    if mode not in MODES:
        raise SurgeryError(f"timing mode must be one of {', '.join(MODES)}, got {mode!r}")
    cache = TimingCache("attention", **machine_facts(), grid=list(grid.shape), heads=heads, head_dim=head_dim,
                        dtype=str(dtype), mode=mode)
    shape = (1, grid.tokens, heads, head_dim)
    result = {}
    for done, (variant, config) in enumerate(candidates):
        label = candidate_label(variant, config)
        if label not in result:
            module = VARIANTS[variant](config, heads=heads, head_dim=head_dim, dim=heads * head_dim).to(device, dtype)
            q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=mode == "training")
                       for _ in range(3))
            x = torch.randn(1, grid.tokens, heads * head_dim, device=device, dtype=dtype)

            def call():
                if mode == "training":
                    module.attend(q, k, v, grid, x).backward(torch.ones(shape, device=device, dtype=dtype))
                else:
                    with torch.no_grad():
                        module.attend(q, k, v, grid, x)

            result[label] = cache.get_or_time(label, lambda: median_ms(call, repeats, device, warmup=2))
        if progress:
            progress(done + 1, len(candidates))
    return result


def step_latency(model, inputs: dict, *, mode: str = "inference", compiled: bool = False,
                 repeats: int = 5) -> tuple[float, float]:
    """Median ms of one forward of `model` on `inputs` (mode="training": forward + backward), stock and with
    its self-attention core skipped: (stock, skipped). compiled: with the blocks compiled (`timing.compile_blocks`,
    as `bench --compile` runs them), which shortens the part of the step that is not attention far more than the
    attention kernels, so a plan for a compiled model must be held to compiled step times."""
    device = require_gpu()
    cache = TimingCache("step", **machine_facts(), config=json.dumps(dict(model.config), sort_keys=True, default=str),
                        shape=list(inputs["hidden_states"].shape), text=list(inputs["encoder_hidden_states"].shape),
                        dtype=str(input_dtype(model)), mode=mode, compiled=compiled)

    def call():
        if mode == "training":
            model(**inputs).sample.float().square().mean().backward()
        else:
            with torch.no_grad():
                model(**inputs)

    warmup = warmup_calls(compiled)
    with blocks_compiled(model) if compiled else contextlib.nullcontext():
        stock = cache.get_or_time("stock", lambda: median_ms(call, repeats, device, warmup=warmup))
        with attention_core_skipped(model):
            skipped = cache.get_or_time("skipped", lambda: median_ms(call, repeats, device, warmup=warmup))
    return stock, skipped
