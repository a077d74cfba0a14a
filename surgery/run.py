"""The main job in one call: plan → distill → export → eval, with a summary of what it gained."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import SurgeryError
from .evaluate import EvalReport, evaluate
from .exporting import export
from .io import atomic_write_json
from .plan import Plan
from .recipe import Recipe
from .train import distill
from .train.distill import DistillSummary


@dataclass
class RunSummary:
    """What `vsurgery run` did and gained (written to summary.json)."""

    run: str
    exported: str
    budget: float | None
    attention_flops_ratio: float
    variants: dict[str, str]  # layer → variant
    distill: DistillSummary
    eval: EvalReport

    @property
    def attention_flops_saved(self) -> float:
        return 1 - self.attention_flops_ratio

    def to_dict(self) -> dict:
        return {**asdict(self), "attention_flops_saved": self.attention_flops_saved}


def run_all(spec: str, recipe: Recipe, out: str | Path, *, eval_samples: int = 1, eval_steps: int = 6,
            progress=None) -> RunSummary:
    """Write out/{plan.json, metrics.jsonl, student.safetensors, …}, out/exported/, out/eval.json and
    out/summary.json."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SurgeryError(f"{out} already exists and is not empty; choose a new --out")
    distilled = distill(spec, recipe, out, progress=progress)
    exported = export(out, out / "exported")
    report = evaluate(str(exported), spec, samples=eval_samples, steps=eval_steps, seed=recipe.train.seed)
    atomic_write_json(out / "eval.json", report.to_dict())
    plan = Plan.load(out / "plan.json")
    summary = RunSummary(
        run=str(out), exported=str(exported), budget=plan.budget, attention_flops_ratio=plan.meta["flops_ratio"],
        variants={fqn: choice.variant for fqn, choice in plan.layers.items()}, distill=distilled, eval=report,
    )
    atomic_write_json(out / "summary.json", summary.to_dict())
    return summary
