"""`vsurgery`: one short function per command; each parses, calls the library once and prints."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer

from surgery.errors import SurgeryError

from . import options as opt
from . import output

app = typer.Typer(
    help="Retrofit Wan2.1 video diffusion transformers with cheaper self-attention.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root():
    """Plan, apply, distill and export cheaper self-attention for Wan2.1 transformers."""


def command(fn):
    """Register a command whose SurgeryError becomes one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SurgeryError as e:
            output.fail(str(e))

    return app.command()(wrapper)


@command
def info(
    model: opt.Model = "tiny",
    frames: opt.Frames = None,
    height: opt.Height = None,
    width: opt.Width = None,
    json: opt.Json = False,
):
    """Show the model: layers, heads, token grid and where a forward's FLOPs go."""
    from surgery.info import model_info

    result = model_info(model, frames, height, width)
    output.print_json(result) if json else output.show_info(result)


@command
def plan(
    budget: Annotated[float, typer.Option(help="Attention FLOPs allowed, as a fraction of dense (0, 1].")] = 0.6,
    model: opt.Model = "tiny",
    out: Annotated[Optional[Path], typer.Option(help="Where to write the plan JSON.")] = Path("plan.json"),
    variants: Annotated[
        Optional[str], typer.Option(help="Comma-separated variants to consider (full is always one).")
    ] = None,
    keep_full: Annotated[Optional[str], typer.Option(help="Comma-separated layer indices to keep dense.")] = None,
    frames: opt.Frames = None,
    height: opt.Height = None,
    width: opt.Width = None,
    samples: Annotated[int, typer.Option(min=1, help="Calibration inputs (timesteps spread over the schedule).")] = 4,
    seed: Annotated[int, typer.Option(help="Seed for calibration inputs and learned-map init.")] = 0,
    json: opt.Json = False,
):
    """Measure each layer's sensitivity and pick a variant per layer under a FLOP budget."""
    from surgery.planner import make_plan

    with output.progress("calibrating") as update:
        result = make_plan(
            model, budget, variants=opt.split_names(variants), keep_full=opt.split_ints(keep_full, "--keep-full"),
            frames=frames, height=height, width=width, samples=samples, seed=seed, progress=update,
        )
    if out is not None:
        result.save(out)
    output.print_json(result.to_dict()) if json else output.show_plan(result, out)


@command
def distill(
    recipe: Annotated[str, typer.Option(help="A shipped recipe name (hybrid, linear, vsa, vmoba, mixed) or a .toml path.")] = "hybrid",
    model: opt.Model = "tiny",
    out: Annotated[Path, typer.Option(help="Run folder to write (plan, metrics, checkpoints, student).")] = Path("runs/distill"),
    plan: Annotated[Optional[Path], typer.Option(help="Use this plan JSON instead of planning.")] = None,
    budget: Annotated[Optional[float], typer.Option(help="Override the recipe's plan budget.")] = None,
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override one recipe field: section.key=value (repeatable).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its newest checkpoint.")] = False,
):
    """Distill the planned attention against the frozen teacher, then fine-tune the student."""
    from surgery.plan import Plan
    from surgery.recipe import load_recipe
    from surgery.train import distill as run_distill

    overrides = list(set_ or []) + ([f"plan.budget={budget}"] if budget is not None else [])
    loaded = load_recipe(recipe, overrides)
    with output.training_progress() as progress:
        summary = run_distill(model, loaded, out, plan=Plan.load(plan) if plan else None, resume=resume,
                              progress=progress)
    output.show_distill(summary)


def main() -> None:
    app()
