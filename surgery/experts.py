"""Wan2.2 A14B's two experts: one plan each in one plan file, each distilled against its own teacher on
the timesteps it serves, exported together as one pipeline folder, and sampled together.

diffusers' pipelines run `transformer` while the timestep t ≥ boundary_ratio·1000 (high noise) and
`transformer_2` below it. Here one expert is the model spec "M@transformer" or "M@transformer_2"
(surgery.model.split_expert): every single-transformer step (plan, distill, export) runs on it as it is,
and `surgery.model.timestep_band` gives it its side of the boundary for calibration and training.

A budget holds for the whole sampling run: each expert's attention FLOPs count by the share of the steps
it serves (on the schedule of `steps` Euler steps at flow shift `shift`), one knapsack over both experts'
layers. With `per_expert`, each expert gets the budget on its own. Training steps (the planner's stage 1,
distill's stages) are split between the experts by the same shares, so both together train as long as one
model does with the same recipe.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import PlanError, SurgeryError
from .io import atomic_write_bytes, atomic_write_json
from .model import EXPERTS, check_expert, expert_spec, is_two_expert_spec, model_kind
from .plan import PLAN_VERSION, Plan, _read_stage1
from .sampling import schedule_timesteps

SAMPLING_STEPS = 40  # Wan2.2 A14B's default number of steps
SAMPLING_SHIFT = 5.0  # and its flow shift (I2V-A14B's; T2V-A14B uses 12)


class TwoExperts(torch.nn.Module):
    """Both experts as one denoiser, for samplers that call one model: `high` where the call's timestep (its
    largest, for one per token) is ≥ boundary_ratio·1000, as diffusers' pipelines switch, else `low`."""

    def __init__(self, high, low, boundary_ratio: float):
        super().__init__()
        self.high, self.low, self.boundary = high, low, boundary_ratio * 1000

    @property
    def config(self):
        return self.high.config

    @property
    def patch_embedding(self):  # the inputs' dtype (surgery.wan.input_dtype)
        return self.high.patch_embedding

    def forward(self, hidden_states, timestep, encoder_hidden_states, **kwargs):
        expert = self.high if float(timestep.max()) >= self.boundary else self.low
        return expert(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                      **kwargs)


def load_denoiser(spec: str, **options):
    """Model `spec` as one denoiser: its transformer, or both experts as `TwoExperts` (surgery.loading.load_model
    options)."""
    from .loading import load_model

    if not is_two_expert_spec(spec):
        return load_model(spec, **options)
    return TwoExperts(load_model(expert_spec(spec, EXPERTS[0]), **options),
                      load_model(expert_spec(spec, EXPERTS[1]), **options), model_kind(spec).boundary_ratio)


def steps_served(boundary_ratio: float, steps: int = SAMPLING_STEPS, shift: float = SAMPLING_SHIFT) -> dict[str, int]:
    """How many of `steps` flow-matching steps at flow shift `shift` each expert serves."""
    high = sum(1 for t in schedule_timesteps(steps, shift) if t >= boundary_ratio * 1000)
    return {EXPERTS[0]: high, EXPERTS[1]: steps - high}


def _scaled(stage, share: float):
    """Training settings with `share` of their steps (at least one, unless the stage is off)."""
    steps = math.ceil(stage.steps * share) if stage.steps else 0
    return dataclasses.replace(stage, steps=steps, warmup_steps=min(steps, round(stage.warmup_steps * share)))


def expert_recipe(recipe, share: float):
    """`recipe` for one expert serving `share` of the sampling steps: that share of its training steps."""
    return dataclasses.replace(recipe, stage1=_scaled(recipe.stage1, share), stage2=_scaled(recipe.stage2, share))


@dataclass
class ExpertPlans:
    """One plan per expert of a two-expert model, saved as one JSON file (each expert's stage-1 weights beside
    it: `plan.json` → `plan.transformer_2.stage1.safetensors`)."""

    model: str
    boundary_ratio: float
    plans: dict[str, Plan]
    budget: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # budget scope, steps served, the run's FLOPs ratio

    def to_dict(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "model": {"id": self.model, "experts": list(self.plans)},
                "boundary_ratio": self.boundary_ratio, "budget": self.budget, **self.meta,
                "experts": {name: plan.to_dict() for name, plan in self.plans.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "ExpertPlans":
        if not isinstance(d, dict) or not isinstance(d.get("experts"), dict):
            raise PlanError("a two-expert plan needs an 'experts' object (one plan per expert)")
        if set(d["experts"]) != set(EXPERTS):
            raise PlanError(f"a two-expert plan needs plans for {' and '.join(EXPERTS)}, got {sorted(d['experts'])}")
        try:
            model, ratio = d["model"]["id"], float(d["boundary_ratio"])
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"malformed two-expert plan: missing or bad field {e}") from None
        meta = {k: v for k, v in d.items() if k not in ("version", "model", "boundary_ratio", "budget", "experts")}
        return cls(model, ratio, {name: Plan.from_dict(d["experts"][name]) for name in EXPERTS}, d.get("budget"), meta)

    def save(self, path: str | Path) -> Path:
        for name, plan in self.plans.items():
            if plan.stage1:
                atomic_write_bytes(expert_stage1_path(path, name), plan._stage1_bytes())
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, stage1_weights: bool = True) -> "ExpertPlans":
        data = _read_plan_json(path)
        if not is_expert_plans(data):
            raise PlanError(f"{path} is a plan for one transformer; a two-expert model needs one plan per expert "
                            "(vsurgery plan on the two-expert model)")
        plans = cls.from_dict(data)
        for name, plan in plans.plans.items():
            expected = data["experts"][name].get("stage1_weights")
            if stage1_weights and expected:
                plan.stage1 = _read_stage1(expert_stage1_path(path, name), expected, path)
        return plans

    def check_for(self, spec: str) -> None:
        """PlanError when these plans are not for two-expert model `spec` (one transformer, or other experts)."""
        if not is_two_expert_spec(spec):
            raise PlanError(f"the plan holds one plan per expert of a two-expert model; {spec} is one transformer")
        kind = model_kind(spec)
        if self.boundary_ratio != kind.boundary_ratio:
            raise PlanError(f"the plan was made for experts switched at boundary ratio {self.boundary_ratio:g}; "
                            f"{spec} switches at {kind.boundary_ratio:g}")


def expert_stage1_path(plan_path: str | Path, expert: str) -> Path:
    plan_path = Path(plan_path)
    return plan_path.with_name(f"{plan_path.stem}.{expert}.stage1.safetensors")


def _read_plan_json(path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PlanError(f"plan file {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"cannot read plan {path}: {e}") from None


def is_expert_plans(data) -> bool:
    return isinstance(data, dict) and "experts" in data


def load_plan_for(spec: str, path: str | Path, stage1_weights: bool = True) -> Plan | ExpertPlans:
    """The plan file `path` for model `spec`: a `Plan` for one transformer (or one expert), `ExpertPlans` for a
    two-expert model; a plan of the other kind, or one expert's plan given to the other, is a PlanError."""
    if is_expert_plans(_read_plan_json(path)):
        plans = ExpertPlans.load(path, stage1_weights)
        plans.check_for(spec)
        return plans
    if is_two_expert_spec(spec):
        raise PlanError(f"{path} is a plan for one transformer; {spec} has two experts and needs one plan per expert "
                        "(vsurgery plan --model on it)")
    plan = Plan.load(path, stage1_weights)
    check_expert(plan, spec)
    return plan


def make_expert_plans(spec: str, budget: float, *, per_expert: bool = False, steps: int = SAMPLING_STEPS,
                      shift: float = SAMPLING_SHIFT, **options) -> ExpertPlans:
    """One plan per expert of two-expert model `spec`, each calibrated on the timesteps it serves.

    budget: attention FLOPs (or step time, with cost="latency") over the whole sampling run, each expert weighted
    by the steps it serves of `steps` at flow shift `shift`; with `per_expert`, the budget of each expert alone.
    options: `surgery.planner.calibrate`'s (variants, keep_full, params_by_variant, frames, height, width, samples, seed, data,
    cost, timing, progress, measure).
    """
    from .planner import RESOLUTION, Solution, calibrate, check_budgets, make_plan, min_cost, plan_from_solution, solve

    check_budgets([budget])
    kind = model_kind(spec)
    if not kind.two_experts:
        raise SurgeryError(f"{spec} has one transformer: plan it with one budget (no experts to share it)")
    served = steps_served(kind.boundary_ratio, steps, shift)
    measure = options.pop("measure", None)
    stage1 = getattr(measure, "stage1", None)  # the planner's stage 1 of learned candidates (DistilledErrors)
    options_for = {name: {**options, "measure": dataclasses.replace(measure, stage1=_scaled(stage1, served[name] / steps))
                          if stage1 is not None else measure} for name in EXPERTS}
    meta = {"budget_scope": "per expert" if per_expert else "sampling run",
            "steps_served": {**served, "steps": steps, "shift": shift}}
    if per_expert:
        plans = {name: make_plan(expert_spec(spec, name), budget, **options_for[name]) for name in EXPERTS}
    else:
        contexts = {name: calibrate(expert_spec(spec, name), **options_for[name]) for name in EXPERTS}
        weights = {name: served[name] / steps for name in EXPERTS}
        # One knapsack over both experts' layers: costs and errors count as often as their expert runs.
        costs = [[c * weights[name] for c in row] for name in EXPERTS for row in contexts[name]["costs"]]
        errors = [[e * weights[name] for e in row] for name in EXPERTS for row in contexts[name]["errors"]]
        dense = sum(weights[name] * contexts[name]["dense_total"] for name in EXPERTS)
        fixed = sum(weights[name] * contexts[name]["fixed"] for name in EXPERTS)
        capacity = budget * dense - fixed
        if min_cost(costs) > capacity:
            raise SurgeryError(f"budget {budget:g} is below what the cheapest candidates reach: "
                               f"{(fixed + min_cost(costs)) / dense:.4f} of the dense sampling run")
        solution = solve(errors, costs, capacity, unit=contexts[EXPERTS[0]]["dense_layer"] / RESOLUTION)
        plans, start = {}, 0
        for name in EXPERTS:
            ctx = contexts[name]
            layers = len(ctx["costs"])
            choice = solution.choice[start:start + layers]
            start += layers
            objective = sum(ctx["errors"][i][r] for i, r in enumerate(choice))
            cost = sum(ctx["costs"][i][r] for i, r in enumerate(choice))
            # The bound and gap hold for the joint problem: the run's report carries them.
            plans[name] = plan_from_solution(ctx, Solution(choice, objective, cost, objective, "dp"), budget)
        meta["solver"] = {"method": "one knapsack over both experts' layers, weighted by the steps each serves",
                          "lower_bound": solution.lower_bound, "optimality_gap": solution.gap}
    run_flops = sum(served[name] * plans[name].meta["flops"] for name in EXPERTS)
    run_dense = sum(served[name] * plans[name].meta["dense_flops"] for name in EXPERTS)
    meta["flops_ratio"] = run_flops / run_dense
    return ExpertPlans(spec, kind.boundary_ratio, plans, budget, meta)


def is_expert_run(run: str | Path) -> bool:
    try:
        return "experts" in json.loads((Path(run) / "run.json").read_text())
    except (OSError, json.JSONDecodeError, TypeError):
        return False


def distill_experts(spec: str, recipe, out: str | Path, *, plans: ExpertPlans | None = None, resume: bool = False,
                    force: bool = False, budget_per_expert: bool = False, progress=None) -> dict:
    """`distill` for a two-expert model: plan both experts (or take `plans`), then distill each against its own
    frozen teacher on the timesteps it serves, in out/transformer/ and out/transformer_2/ (run folders of their
    own, each with the recipe's share of training steps for the steps it serves: `expert_recipe`). out/ holds
    run.json, recipe.json and plan.json (both plans). Returns {expert: DistillSummary}."""
    from .lock import LOCK_NAME, folder_lock
    from .train import distill
    from .train.distill import check_run_folder, distill_summary, is_run_folder, saved_run
    from .train.distilled_errors import recipe_plan_options
    from .train.loop import stage_progress

    out = Path(out)
    check_run_folder(out, resume, force)
    with folder_lock(out):
        if resume:
            info, recipe = saved_run(out)
            spec, plans = info["model"], ExpertPlans.load(out / "plan.json")
        else:
            if plans is None and recipe.plan.path:
                plans = ExpertPlans.load(recipe.plan.path)
            if plans is not None:
                plans.check_for(spec)
            else:
                plans = make_expert_plans(spec, recipe.plan.budget, per_expert=budget_per_expert,
                                          **recipe_plan_options(recipe, stage_progress(progress, "calibrating")))
            for entry in out.iterdir():  # with `force`, the earlier run's files (the lock stays)
                if entry.name != LOCK_NAME:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            atomic_write_json(out / "recipe.json", recipe.to_dict())
            plans.save(out / "plan.json")
            atomic_write_json(out / "run.json", {"model": spec, "recipe": recipe.name, "experts": list(EXPERTS),
                                                 "finished": False})
        served = plans.meta["steps_served"]
        for name in EXPERTS:
            sub = out / name
            if is_run_folder(sub) and saved_run(sub)[0].get("finished"):
                continue
            distill(expert_spec(spec, name), expert_recipe(recipe, served[name] / served["steps"]), sub,
                    plan=plans.plans[name], resume=is_run_folder(sub), progress=progress)
        atomic_write_json(out / "run.json", {"model": spec, "recipe": recipe.name, "experts": list(EXPERTS),
                                             "finished": True})
    return {name: distill_summary(out / name) for name in EXPERTS}

