"""Choose one candidate per layer: a multiple-choice knapsack over cost models and measured errors.

minimise Σ_i e[i][r]  subject to  Σ_i c[i][r] ≤ capacity, one r per layer i   (Attention Surgery §3.3)

Solved exactly by dynamic programming over costs discretised in a fixed unit, rounded *up* so every
returned plan truly fits. The unit is fixed by the caller (not by the budget), so a larger budget
can only do better. A Lagrangian relaxation gives a lower bound on the true optimum; the
difference to the DP's objective is the reported optimality gap (it is zero whenever the
discretisation is exact, e.g. integer costs with unit 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import SurgeryError


@dataclass(frozen=True)
class Solution:
    choice: list[int]  # index of the chosen candidate, per layer
    objective: float  # Σ error of the choice
    cost: float  # Σ cost of the choice, in the caller's units
    lower_bound: float  # Lagrangian bound on the optimum of the undiscretised problem
    method: str

    @property
    def gap(self) -> float:
        return max(0.0, self.objective - self.lower_bound)


def min_cost(costs: list[list[float]]) -> float:
    return sum(min(layer) for layer in costs)


def solve(errors: list[list[float]], costs: list[list[float]], capacity: float, unit: float) -> Solution:
    """Exact DP over costs in multiples of `unit` (rounded up). Ties go to the earlier candidate."""
    if len(errors) != len(costs) or any(len(e) != len(c) or not e for e, c in zip(errors, costs)):
        raise SurgeryError("every layer needs at least one candidate, with one error per cost")
    if capacity < min_cost(costs) - 1e-9 * max(1.0, abs(capacity)):
        raise SurgeryError(f"capacity {capacity:g} is below the cheapest choice's {min_cost(costs):g}")
    slots = int(math.floor(capacity / unit + 1e-9))
    weights = [[int(math.ceil(c / unit - 1e-9)) for c in layer] for layer in costs]
    inf = math.inf
    best = np.full(slots + 1, inf)  # best[w]: least error using exactly w units over the layers so far
    best[0] = 0.0
    picks = []  # per layer: [slots+1] chosen candidate
    for layer_errors, layer_weights in zip(errors, weights):
        new = np.full(slots + 1, inf)
        pick = np.full(slots + 1, -1, dtype=np.int64)
        for r, (e, w) in enumerate(zip(layer_errors, layer_weights)):
            if w > slots:
                continue
            shifted = np.full(slots + 1, inf)
            shifted[w:] = best[: slots + 1 - w] + e
            better = shifted < new
            new[better] = shifted[better]
            pick[better] = r
        best = new
        picks.append(pick)
    if not np.isfinite(best).any():
        raise SurgeryError("no choice fits the capacity once costs are rounded up to the planner's resolution")
    w = int(np.argmin(best))  # argmin returns the first (cheapest) among equal errors
    choice = []
    for layer_weights, pick in zip(reversed(weights), reversed(picks)):
        r = int(pick[w])
        choice.append(r)
        w -= layer_weights[r]
    choice.reverse()
    cost = sum(c[r] for c, r in zip(costs, choice))
    objective = sum(e[r] for e, r in zip(errors, choice))
    return Solution(choice, objective, cost, lagrangian_bound(errors, costs, capacity), "dp")


def lagrangian_bound(errors, costs, capacity: float) -> float:
    """max over λ ≥ 0 of Σ_i min_r (e_ir + λ·c_ir) − λ·capacity: a lower bound on the optimum.

    The dual is concave and piecewise linear with breakpoints where a layer's best candidate
    changes, so evaluating it at every pairwise crossing λ finds its maximum exactly.
    """
    def dual(lam):
        return sum(min(e + lam * c for e, c in zip(le, lc)) for le, lc in zip(errors, costs)) - lam * capacity

    lambdas = {0.0}
    for le, lc in zip(errors, costs):
        for i in range(len(le)):
            for j in range(i + 1, len(le)):
                if lc[i] != lc[j]:
                    lam = (le[j] - le[i]) / (lc[i] - lc[j])
                    if lam > 0:
                        lambdas.add(lam)
    return max(dual(lam) for lam in lambdas)


# Cost resolution of the DP: 1/RESOLUTION of one dense layer. Fixed per model, so budgets compare.
RESOLUTION = 1000
# Sampler steps of the planner's whole-student check (see `_checked_whole`).
CHECK_STEPS = 4


COSTS = ("flops", "latency")
FASTEST = "fastest"  # a budget meaning: the cheapest candidate on every layer (fewest errors among ties)


def make_plan(spec: str = "tiny", budget: float = 0.6, **options):
    """Measure every candidate on every layer, then pick per layer so the plan's cost ≤ budget × dense.
    One plan of `make_plans`; see there for the options."""
    return make_plans(spec, [budget], **options)[0]


def make_plans(
    spec: str = "tiny",
    budgets: list[float | str] = (0.6,),
    *,
    variants: list[str] | None = None,
    keep_full: list[int] | None = None,
    params_by_variant: dict[str, dict] | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    samples: int = 4,
    seed: int = 0,
    data: str | None = None,
    cost: str = "flops",
    timing: str = "inference",
    compiled: bool = False,
    dense_steps: int = 0,
    sampling_steps: int = 50,
    model=None,
    progress=None,
    measure=None,
):
    """One plan per budget (a fraction of dense in (0, 1], or FASTEST), from one calibration.

    dense_steps: how many of the first (highest-noise) of `sampling_steps` sampling steps keep the model's dense
    attention (`Plan.dense_boundary`). The budget holds for the sampling run: those steps count as dense, the
    rest get what is left, (budget − share)/(1 − share) of dense; candidates are calibrated and trained on the
    timesteps below the boundary, the ones they serve.

    params_by_variant: per variant, settings laid over each of its `plan_candidates` (a recipe's
    `[plan] params_by_variant`, e.g. a feature map).

    cost="flops" (default): attention FLOPs from the variants' cost models at the target grid, never timing.
    cost="latency": the predicted step time — the step with its attention core skipped plus each layer's
    timed attention (`surgery.latency`; `timing` "inference" or "training") — against budget × the stock
    step, both measured on this GPU (`compiled`: the steps timed with the blocks compiled).
    Calibration runs on CUDA in bf16 where there is a GPU (the kernels, never a tokens × tokens tensor).
    measure: how the errors are measured, `measure(model, candidates, inputs, grid=, seed=, data=,
    text_tokens=, progress=)` → `ErrorTable`, where inputs are the calibration inputs; default: every
    candidate as built (`sensitivity.measure_errors`). `surgery.train.distilled_errors.DistilledErrors`
    measures learned candidates after stage 1 (Attention Surgery's e_ir); the plan then carries the
    chosen ones' trained weights (`Plan.stage1`).
    Each `Plan` has the per-layer choice, its FLOPs and measured error, and the solver report.
    """
    check_budgets(budgets)
    context = calibrate(spec, variants=variants, keep_full=keep_full, params_by_variant=params_by_variant,
                        frames=frames, height=height, width=width, samples=samples, seed=seed, data=data, cost=cost,
                        timing=timing, compiled=compiled, dense_steps=dense_steps, sampling_steps=sampling_steps,
                        model=model, progress=progress, measure=measure)
    return [solve_plan(context, budget) for budget in budgets]


def check_budgets(budgets) -> None:
    for budget in budgets:
        if budget != FASTEST and not (isinstance(budget, (int, float)) and 0.0 < budget <= 1.0):
            raise SurgeryError(f"--budget must be in (0, 1], got {budget}")


def calibrate(spec: str, *, variants=None, keep_full=None, params_by_variant=None, frames=None, height=None,
              width=None, samples: int = 4,
              seed: int = 0, data=None, cost: str = "flops", timing: str = "inference", compiled: bool = False,
              dense_steps: int = 0, sampling_steps: int = 50, model=None, progress=None, measure=None) -> dict:
    """Everything `make_plans` solves over, for any budget: each layer's allowed candidates with their costs
    and errors, and the dense yardsticks (see there for the options)."""
    import torch

    from .loading import load_model
    from .model import default_text_tokens, is_toy, model_kind, resolve_grid, timestep_band
    from .sampling import DenseSteps
    from .sensitivity import calibration_inputs, default_candidates, measure_errors
    from .variants import VARIANTS, dense_attention_flops
    from .wan import input_dtype

    if cost not in COSTS:
        raise SurgeryError(f"--cost must be one of {', '.join(COSTS)}, got {cost!r}")
    if cost == "latency":
        from .latency import require_gpu

        require_gpu()
    elif compiled:
        raise SurgeryError("--compiled times the step for --cost latency; a FLOP budget does not depend on it")
    dense = None
    if dense_steps:
        if model_kind(spec).two_experts:  # the model or one of its experts
            raise SurgeryError("--dense-steps plans one transformer; a two-expert model already gives its high-noise "
                               "steps to an expert of their own")
        dense = DenseSteps(dense_steps, sampling_steps)
    candidates = default_candidates(variants, params_by_variant)
    if model is None:
        on_gpu = torch.cuda.is_available()
        model = load_model(spec, device="cuda" if on_gpu else None, dtype=torch.bfloat16 if on_gpu else None)
    config = dict(model.config)
    heads, head_dim, num_layers = config["num_attention_heads"], config["attention_head_dim"], config["num_layers"]
    pinned = set(keep_full or [])
    bad = sorted(i for i in pinned if not 0 <= i < num_layers)
    if bad:
        raise SurgeryError(f"--keep-full layer {bad[0]} does not exist (the model has layers 0–{num_layers - 1})")
    grid = resolve_grid(spec, config, frames, height, width)

    # One expert of two (spec "M@transformer_2") is calibrated and trained on the timesteps it serves.
    band = timestep_band(spec, dense.boundary if dense else None)
    image_tokens = model_kind(spec).image_tokens
    inputs = calibration_inputs(model, grid, samples, seed, default_text_tokens(spec), dataset_path=data, band=band,
                                image_tokens=image_tokens)
    if measure is None:
        table = measure_errors(model, inputs, candidates, seed=seed, progress=progress)
    else:
        table = measure(model, candidates, inputs, grid=grid, seed=seed, data=data,
                        text_tokens=default_text_tokens(spec), progress=progress, band=band, image_tokens=image_tokens)

    allowed = [
        [j for j, c in enumerate(candidates) if i not in pinned or c.variant == "full"] for i in range(num_layers)
    ]
    flops = [[VARIANTS[candidates[j].variant].flops(table.configs[i][j], grid, heads, head_dim) for j in allowed[i]]
             for i in range(num_layers)]
    errors = [[table.errors[i][j] for j in allowed[i]] for i in range(num_layers)]
    dense_layer_flops = dense_attention_flops(grid.tokens, heads, head_dim)
    context = dict(spec=spec, config=config, grid=grid, candidates=candidates, table=table, allowed=allowed,
                   flops=flops, errors=errors, dense_layer_flops=dense_layer_flops, cost=cost, model=model,
                   dense_steps=dense,
                   calibration={"samples": samples, "seed": seed,
                                 "timesteps": "spread evenly over (%g, %g)" % (1000 * band[0], 1000 * band[1]),
                                 "inputs": f"dataset {data}, noised" if data else "the toy's clips and captions, noised"
                                if is_toy(config) else "random latents and text embeddings"})
    if cost == "flops":
        context |= dict(costs=flops, dense_layer=dense_layer_flops, dense_total=dense_layer_flops * num_layers,
                        fixed=0.0)
    else:
        from .latency import attention_latency, candidate_label, step_latency

        dtype = input_dtype(model)
        configs = [(candidates[j].variant, table.configs[i][j]) for i in range(num_layers) for j in allowed[i]]
        times = attention_latency(configs, grid, heads, head_dim, dtype=dtype, mode=timing)
        stock_ms, fixed = step_latency(model, inputs[0], mode=timing, compiled=compiled)
        context |= dict(
            costs=[[times[candidate_label(candidates[j].variant, table.configs[i][j])] for j in allowed[i]]
                   for i in range(num_layers)],
            dense_layer=times[candidate_label("full", VARIANTS["full"].Config())], dense_total=stock_ms, fixed=fixed,
            latency={"timing": timing, "compiled": compiled, "device": torch.cuda.get_device_name(),
                     "stock_step_ms": stock_ms,
                     "skipped_attention_step_ms": fixed},
        )
    return context


def solve_plan(ctx: dict, budget: float | str):
    """The plan for one budget from a calibration's context (see `make_plans`)."""
    costs, errors, fixed, latency = ctx["costs"], ctx["errors"], ctx["fixed"], ctx["cost"] == "latency"
    cheapest = min_cost(costs)
    dense = ctx["dense_steps"]
    run_ratio = dense.run_ratio if dense else (lambda ratio: ratio)
    if budget == FASTEST:
        choice = [min(range(len(c)), key=lambda r: (c[r], e[r])) for c, e in zip(costs, errors)]
        total_error = sum(e[r] for e, r in zip(errors, choice))
        # No other plan reaches this cost: there is nothing to trade, so no gap to report.
        solution = Solution(choice, total_error, cheapest, total_error, "cheapest")
        budget = run_ratio((fixed + cheapest) / ctx["dense_total"])
    else:
        # With dense steps, they take their share of the run and each planned step gets what is left.
        capacity = (dense.planned_budget(budget) if dense else budget) * ctx["dense_total"] - fixed
        if cheapest > capacity:
            raise SurgeryError(
                f"budget {budget:g} is below what the cheapest candidates reach: "
                f"{run_ratio((fixed + cheapest) / ctx['dense_total']):.4f} of the dense "
                + ("step time" if latency else "attention FLOPs")
                + (f" of the sampling run with {dense.steps} dense steps" if dense else "")
            )
        solution = solve(errors, costs, capacity, unit=ctx["dense_layer"] / RESOLUTION)
        if ctx["table"].built_errors is not None:
            return _checked_whole(ctx, solution, capacity, budget)
    return plan_from_solution(ctx, solution, budget)


def _checked_whole(ctx: dict, solution: Solution, capacity: float, budget: float):
    """With errors measured after stage 1: of the knapsack's plan, the plan that the errors as built choose and
    each single variant on every layer (at its most expensive setting that fits), the one whose whole student
    (every chosen processor as trained, installed at once) samples closest to the model: final latents after
    CHECK_STEPS Euler steps from as many starts as calibration inputs. The table measures each candidate with
    every other layer exact; sampling with the whole student shows how the chosen layers' errors compound,
    over layers and over steps."""
    from .swap import forward_context
    from .trajectories import final_latents, processors_error, sampling_starts
    from .wan import self_attention_fqn

    table, allowed, errors, costs, model = ctx["table"], ctx["allowed"], ctx["errors"], ctx["costs"], ctx["model"]
    built = [[table.built_errors[i][j] for j in allowed[i]] for i in range(len(allowed))]
    choices = {"errors after stage 1": solution.choice,
               "errors as built": solve(built, costs, capacity, unit=ctx["dense_layer"] / RESOLUTION).choice,
               **_uniform_choices(ctx, capacity)}
    if "check" not in ctx:
        starts, _ = sampling_starts(model, ctx["spec"], ctx["grid"], ctx["calibration"]["samples"],
                                    ctx["calibration"]["seed"])
        ctx["check"] = starts, final_latents(model, starts, CHECK_STEPS)
    starts, reference = ctx["check"]
    whole, seen = {}, set()
    forward = forward_context(model)
    # Sampled as the plan will run, its dense steps dense; the model's own processors ignore the boundary, and it
    # is cleared after the check.
    forward.dense_boundary = ctx["dense_steps"].boundary if ctx["dense_steps"] else None
    try:
        for name, choice in choices.items():
            if tuple(choice) in seen:  # the same plan reached another way: sampled once
                continue
            seen.add(tuple(choice))
            processors = {self_attention_fqn(i): table.modules[i][allowed[i][r]] for i, r in enumerate(choice)}
            whole[name] = processors_error(model, starts, CHECK_STEPS, reference, processors)
    finally:
        forward.dense_boundary = None
    kept = min(whole, key=whole.get)
    if kept != "errors after stage 1":
        choice = choices[kept]
        solution = Solution(choice, sum(errors[i][r] for i, r in enumerate(choice)),
                            sum(costs[i][r] for i, r in enumerate(choice)), solution.lower_bound, "dp")
    plan = plan_from_solution(ctx, solution, budget)
    plan.meta["whole_student_check"] = {
        "final_latent_error": whole, "kept": kept,
        "how": f"each plan sampled whole, {CHECK_STEPS} steps from {len(starts)} starts, against the model's "
               "own samples"}
    return plan


def _uniform_choices(ctx: dict, capacity: float) -> dict[str, list[int]]:
    """Per variant but full, its most expensive candidate setting that every layer allows and that fits
    `capacity` on every layer, as a choice per layer; named "<setting> on every layer"."""
    candidates, allowed, costs = ctx["candidates"], ctx["allowed"], ctx["costs"]
    best: dict[str, tuple[float, str, list[int]]] = {}
    for j, candidate in enumerate(candidates):
        if candidate.variant == "full" or any(j not in layer for layer in allowed):
            continue
        choice = [layer.index(j) for layer in allowed]
        cost = sum(costs[i][r] for i, r in enumerate(choice))
        if cost <= capacity and cost > best.get(candidate.variant, (-1.0,))[0]:
            best[candidate.variant] = (cost, f"{candidate.label()} on every layer", choice)
    return {name: choice for _, name, choice in best.values()}


def plan_from_solution(ctx: dict, solution: Solution, budget: float):
    """The plan of a solver's choice over a calibration's context: layers, stage-1 weights and the report."""
    from .plan import LayerChoice, Plan
    from .wan import fingerprint, self_attention_fqn

    costs, errors, flops, fixed = ctx["costs"], ctx["errors"], ctx["flops"], ctx["fixed"]
    num_layers, latency = len(costs), ctx["cost"] == "latency"
    candidates, table, allowed = ctx["candidates"], ctx["table"], ctx["allowed"]
    layers, stage1 = {}, {}
    for i, r in enumerate(solution.choice):
        j = allowed[i][r]
        layers[self_attention_fqn(i)] = LayerChoice(candidates[j].variant, table.configs[i][j], flops[i][r],
                                                    errors[i][r])
        for name, tensor in table.trained.get((i, j), {}).items():
            stage1[f"{self_attention_fqn(i)}.processor.{name}"] = tensor
    plan_flops = sum(flops[i][r] for i, r in enumerate(solution.choice))
    dense_flops = ctx["dense_layer_flops"] * num_layers
    dense_steps = ctx["dense_steps"]
    meta = {
        "dense_flops": dense_flops,
        "flops": plan_flops,  # of one planned step
        # Over the sampling run: with dense steps, those at 1 and the planned ones at the plan's ratio.
        "flops_ratio": dense_steps.run_ratio(plan_flops / dense_flops) if dense_steps else plan_flops / dense_flops,
        "total_error": solution.objective,
        "cost": ctx["cost"],
        "solver": {
            "method": ("the cheapest candidate of every layer" if solution.method == "cheapest" else
                       "exact dynamic programming over costs rounded up to 1/%d of a dense layer" % RESOLUTION),
            "lower_bound": solution.lower_bound,
            "optimality_gap": solution.gap,
        },
        "calibration": {**ctx["calibration"], "errors": table.method},
        "candidates": [
            {"layer": i, "label": candidates[j].label(), "flops": flops[i][r], "error": errors[i][r],
             **({"ms": costs[i][r]} if latency else {}),
             **({"stage1_loss": list(table.losses[i, j])} if (i, j) in table.losses else {})}
            for i in range(num_layers)
            for r, j in enumerate(allowed[i])
        ],
    }
    if dense_steps:
        meta["dense_steps"] = {"steps": dense_steps.steps, "of": dense_steps.of, "flow_shift": dense_steps.flow_shift,
                               "planned_steps_flops_ratio": plan_flops / dense_flops}
    if latency:
        predicted, stock = fixed + solution.cost, ctx["latency"]["stock_step_ms"]
        meta["latency"] = {**ctx["latency"], "predicted_step_ms": predicted, "predicted_speedup": stock / predicted}
        if dense_steps:
            meta["latency"]["predicted_run_speedup"] = 1 / dense_steps.run_ratio(predicted / stock)
    return Plan(ctx["spec"], fingerprint(ctx["config"]), num_layers, layers, ctx["grid"], budget, meta,
                dense_boundary=dense_steps.boundary if dense_steps else None, stage1=stage1 or None)
