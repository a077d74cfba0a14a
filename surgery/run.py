"""The main job in one call: plan → distill → export → eval, with a summary of what it gained."""

from __future__ import annotations

from pathlib import Path

from .errors import SurgeryError
from .evaluate import evaluate
from .exporting import export
from .io import atomic_write_json
from .plan import Plan
from .recipe import Recipe
from .train import distill


def run_all(spec: str, recipe: Recipe, out: str | Path, *, eval_samples: int = 1, eval_steps: int = 6,
            progress=None) -> dict:
    """Write out/{plan.json, metrics.jsonl, student.safetensors, …}, out/exported/ and out/eval.json."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SurgeryError(f"{out} already exists and is not empty; choose a new --out")
    summary = distill(spec, recipe, out, progress=progress)
    exported = export(out, out / "exported")
    report = evaluate(str(exported), spec, samples=eval_samples, steps=eval_steps, seed=recipe.train.seed)
    atomic_write_json(out / "eval.json", report)
    plan = Plan.load(out / "plan.json")
    result = {
        "run": str(out),
        "exported": str(exported),
        "budget": plan.budget,
        "attention_flops_ratio": plan.meta["flops_ratio"],
        "attention_flops_saved": 1 - plan.meta["flops_ratio"],
        "variants": {fqn: choice.variant for fqn, choice in plan.layers.items()},
        "stage1_losses": summary.get("stage1_losses", {}),
        "stage1_uniform_attention": summary.get("stage1_uniform_attention", {}),
        "stage2_final_loss": summary.get("stage2_final_loss"),
        "eval": report,
    }
    atomic_write_json(out / "summary.json", result)
    return result
