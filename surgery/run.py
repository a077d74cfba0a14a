"""The main job in one call: plan → distill → export → eval, with a summary of what it gained."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .evaluate import EvalReport, evaluate
from .experts import ExpertPlans, distill_experts, is_expert_run
from .model import EXPERTS, is_two_expert_spec
from .exporting import export
from .io import atomic_write_json, check_output_folder
from .lock import folder_lock
from .parallel import is_main_process
from .plan import Plan
from .recipe import Recipe
from .train import distill
from .train.distill import DistillSummary, check_run_folder, distill_summary, saved_run
from .train.loop import stage_progress


@dataclass
class RunSummary:
    """What `vsurgery run` did and gained (written to summary.json)."""

    run: str
    exported: str
    budget: float | None
    attention_flops_ratio: float  # of a two-expert model: over the sampling run, each expert by the steps it serves
    variants: dict[str, str]  # layer → variant (two experts: "transformer_2.blocks.0.attn1" → variant)
    distill: DistillSummary | dict[str, DistillSummary]  # two experts: per expert
    eval: EvalReport

    @property
    def attention_flops_saved(self) -> float:
        return 1 - self.attention_flops_ratio

    def to_dict(self) -> dict:
        return {**asdict(self), "attention_flops_saved": self.attention_flops_saved}


def run_all(spec: str, recipe: Recipe, out: str | Path, *, eval_samples: int = 1, eval_steps: int = 6,
            resume: bool = False, force: bool = False, budget_per_expert: bool = False,
            progress=None) -> RunSummary | None:
    """Write out/{plan.json, metrics.jsonl, student.safetensors, …}, out/exported/, out/eval.json and
    out/summary.json.

    resume: continue an interrupted `run_all` in `out` — its distillation where it stopped (or not at
    all, if it finished), then the export unless it was written, then eval. force: replace an earlier
    run in `out`. A two-expert model (Wan2.2 A14B) plans, distills and exports both experts (surgery.experts);
    budget_per_expert: its budget holds for each expert, not for the sampling run. In a multi-process launch
    the processes distill together, then only the main one exports and evaluates; the others return None.
    """

    out = Path(out)
    if resume:
        info, recipe = saved_run(out)  # the run's own model and recipe
        spec = info["model"]
        check_output_folder(out, force=True)  # the run's files stay: only write access is checked
    else:
        check_run_folder(out, resume=False, force=force)
    exported = out / "exported"
    two = is_expert_run(out) if resume else is_two_expert_spec(spec)
    with folder_lock(out):
        if resume and info.get("finished"):
            distilled = {name: distill_summary(out / name) for name in EXPERTS} if two else distill_summary(out)
        elif two:
            distilled = distill_experts(spec, recipe, out, resume=resume, force=force,
                                        budget_per_expert=budget_per_expert, progress=progress)
        else:
            distilled = distill(spec, recipe, out, resume=resume, force=force, progress=progress)
        if not is_main_process():
            return None
        if not exported.is_dir():  # an export appears whole or not at all
            export(out, exported)
        report = evaluate(str(exported), spec, samples=eval_samples, steps=eval_steps, seed=recipe.train.seed,
                          progress=stage_progress(progress, "eval"))
        atomic_write_json(out / "eval.json", report.to_dict())
        plan = ExpertPlans.load(out / "plan.json", stage1_weights=False) if two else \
            Plan.load(out / "plan.json", stage1_weights=False)
        layers = {f"{name}.{fqn}": choice for name, one in plan.plans.items() for fqn, choice in one.layers.items()} \
            if two else plan.layers
        summary = RunSummary(
            run=str(out), exported=str(exported), budget=plan.budget, attention_flops_ratio=plan.meta["flops_ratio"],
            variants={fqn: choice.variant for fqn, choice in layers.items()}, distill=distilled, eval=report,
        )
        atomic_write_json(out / "summary.json", summary.to_dict())
    return summary
