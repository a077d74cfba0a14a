"""A model with a plan applied and no distillation: how users of training-free sparse attention work
(VSA's fine stage alone, VMoBA), with the planner choosing per layer.

Variants whose new parameters are only meaningful after training (learned feature maps) are refused
here: their output would be a loose approximation nobody asked for.
"""

from __future__ import annotations

from pathlib import Path

from .errors import PlanError
from .loading import load_model
from .plan import Plan
from .swap import apply
from .variants import VARIANTS


def check_training_free(plan: Plan) -> None:
    """PlanError naming the first layer whose variant needs distillation before use."""
    for fqn, choice in plan.layers.items():
        if not VARIANTS[choice.variant].training_free:
            raise PlanError(
                f"{fqn} is {choice.variant}, whose feature maps must be trained before use: distill this plan "
                "(vsurgery distill --plan PLAN) and use the run's export, or plan with training-free variants "
                f"({', '.join(name for name, cls in VARIANTS.items() if cls.training_free)})"
            )


def check_plan_grid(plan: Plan, grid) -> None:
    """PlanError when `plan` was made for another token grid than `grid`: its costs (and VMoBA's calibrated
    densities) hold for the grid it was planned at."""
    if plan.grid is not None and plan.grid != grid:
        raise PlanError(f"the plan was made for the {plan.grid} token grid and this video is {grid}: "
                        "plan again at this size (--frames/--height/--width)")


def load_planned(spec: str, plan: Plan | str | Path, *, dtype=None, device=None, training_free: bool = True):
    """Model `spec` with `plan` applied. training_free=False also accepts learned variants at their
    initialisation (for timing only: their output means nothing before distillation)."""
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    if training_free:
        check_training_free(plan)
    return apply(load_model(spec, dtype=dtype, device=device), plan)
