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


def command(fn=None, *, name: str | None = None):
    """Register a command whose SurgeryError becomes one line on stderr and exit code 2, whose Ctrl-C
    becomes one line and exit code 130, and whose library warnings print as lines on stderr."""

    def register(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            output.show_library_warnings()
            try:
                return fn(*args, **kwargs)
            except SurgeryError as e:
                output.fail(str(e))
            except KeyboardInterrupt:
                output.interrupted()

        return app.command(name)(wrapper)

    return register(fn) if fn is not None else register


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
    output.print_json(result.to_dict()) if json else output.show_info(result)


@command
def plan(
    budget: Annotated[float, typer.Option(help="Attention FLOPs allowed, as a fraction of dense (0, 1].")] = 0.6,
    model: opt.Model = "tiny",
    out: Annotated[Path, typer.Option(help="Where to write the plan JSON (a new file, unless --force).")] = Path("plan.json"),
    variants: Annotated[
        Optional[str], typer.Option(help="Comma-separated variants to consider (full is always one).")
    ] = None,
    keep_full: Annotated[Optional[str], typer.Option(help="Comma-separated layer indices to keep dense.")] = None,
    frames: opt.Frames = None,
    height: opt.Height = None,
    width: opt.Width = None,
    samples: Annotated[int, typer.Option(min=1, help="Calibration inputs (timesteps spread over the schedule).")] = 4,
    seed: Annotated[int, typer.Option(help="Seed for calibration inputs and learned-map init.")] = 0,
    data: Annotated[
        Optional[str], typer.Option(help="A datasets folder (latents, text_embeddings) to calibrate on.")
    ] = None,
    cost: Annotated[str, typer.Option(
        help="What the budget limits: 'flops' (attention FLOPs, from cost models) or 'latency' (the step time "
             "predicted from attention timed on this GPU; needs CUDA).")] = "flops",
    timing: Annotated[str, typer.Option(
        "--for", help="With --cost latency: time 'inference' (forward) or 'training' (forward + backward).")
    ] = "inference",
    compiled: Annotated[bool, typer.Option(
        "--compiled", help="With --cost latency: plan for compiled blocks (as bench --compile runs them): the step "
                           "is timed compiled.")] = False,
    dense_steps: Annotated[Optional[int], typer.Option(
        min=0, help="Keep dense attention for the first N sampling steps (high noise, where a video's layout is "
                    "set); the budget counts them as dense. Default: the recipe's.")] = None,
    sampling_steps: Annotated[Optional[int], typer.Option(
        min=2, help="The sampling steps --dense-steps counts in (default: the recipe's, 50).")] = None,
    no_distill_errors: Annotated[bool, typer.Option(
        "--no-distill-errors",
        help="Measure learned candidates (feature maps) at their init (fast), not after stage 1 as distill trains them.",
    )] = False,
    recipe: Annotated[str, typer.Option(
        help="Recipe (name or .toml) whose stage-1 settings train the learned candidates before they are measured, "
             "and whose [plan] params_by_variant set the candidates' settings.",
    )] = "mixed",
    budget_per_expert: opt.BudgetPerExpert = False,
    force: opt.Force = False,
    json: opt.Json = False,
):
    """Measure each layer's sensitivity and pick a variant per layer under a FLOP or step-time budget."""
    import time

    from surgery.experts import make_expert_plans
    from surgery.io import check_output_file
    from surgery.model import is_two_expert_spec
    from surgery.planner import make_plan
    from surgery.recipe import load_recipe

    check_output_file(out, force=force)
    loaded = load_recipe(recipe)
    measure = None
    if not no_distill_errors:
        from surgery.train.distilled_errors import DistilledErrors

        measure = DistilledErrors.for_recipe(loaded)
    started = time.perf_counter()
    with output.progress("calibrating" if no_distill_errors else "stage 1 of learned candidates, then calibration") as update:
        options = dict(variants=opt.split_names(variants), keep_full=opt.split_ints(keep_full, "--keep-full"),
                       params_by_variant=loaded.plan.params_by_variant, frames=frames, height=height, width=width,
                       samples=samples, seed=seed, data=data, cost=cost, timing=timing, compiled=compiled, progress=update,
                       measure=measure, dense_steps=loaded.plan.dense_steps if dense_steps is None else dense_steps,
                       sampling_steps=loaded.plan.sampling_steps if sampling_steps is None else sampling_steps)
        if is_two_expert_spec(model):
            result = make_expert_plans(model, budget, per_expert=budget_per_expert, **options)
        else:
            result = make_plan(model, budget, **options)
    result.save(out)
    if json:
        output.print_json(result.to_dict())
    elif is_two_expert_spec(model):
        output.show_expert_plans(result, out, time.perf_counter() - started)
    else:
        output.show_plan(result, out, time.perf_counter() - started)


@command
def distill(
    recipe: Annotated[str, typer.Option(help="A shipped recipe name (hybrid, hybrid-selected, linear, vsa, vmoba, mixed) or a .toml path.")] = "hybrid",
    model: opt.Model = "tiny",
    out: Annotated[
        Path, typer.Option(help="Run folder to write (plan, metrics, checkpoints, student); new or empty, "
                                "unless --resume or --force.")
    ] = Path("runs/distill"),
    plan: Annotated[Optional[Path], typer.Option(help="Use this plan JSON instead of planning.")] = None,
    budget: Annotated[Optional[float], typer.Option(help="Override the recipe's plan budget.")] = None,
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override one recipe field: section.key=value (repeatable).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its newest checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier run in --out.")] = False,
    budget_per_expert: opt.BudgetPerExpert = False,
):
    """Distill the planned attention against the frozen teacher, then fine-tune the student (a two-expert model:
    each expert against its own teacher, on the timesteps it serves)."""
    from surgery.experts import distill_experts, is_expert_run, load_plan_for
    from surgery.model import is_two_expert_spec
    from surgery.recipe import load_recipe
    from surgery.train import distill as run_distill

    overrides = list(set_ or []) + ([f"plan.budget={budget}"] if budget is not None else [])
    loaded = load_recipe(recipe, overrides)
    loaded_plan = load_plan_for(model, plan) if plan and not resume else None
    with output.resumable("distill", out), output.training_progress() as progress:
        if is_expert_run(out) if resume else is_two_expert_spec(model):
            summaries = distill_experts(model, loaded, out, plans=loaded_plan, resume=resume, force=force,
                                        budget_per_expert=budget_per_expert, progress=progress)
        else:
            summaries = {"": run_distill(model, loaded, out, plan=loaded_plan, resume=resume, force=force,
                                         progress=progress)}
    for summary in summaries.values():
        output.show_distill(summary)


@command
def export(
    run: Annotated[Optional[Path], typer.Option(help="A finished distill run folder.")] = None,
    model: opt.Model = "tiny",
    plan: opt.TrainingFreePlan = None,
    out: Annotated[Path, typer.Option(help="Folder to write (new or empty, unless --force).")] = Path("exported"),
    merge_lora: Annotated[bool, typer.Option(help="Fold LoRA weights into the base weights.")] = False,
    force: opt.Force = False,
):
    """Write a student as a diffusers folder that loads back retrofitted, with a SHA-256 manifest: a distill run's
    (--run), or --model with a training-free --plan (no distillation)."""
    from surgery.exporting import export as export_run
    from surgery.exporting import export_planned

    if (run is None) == (plan is None):
        raise SurgeryError("give either --run (a distill run) or --plan (a training-free plan for --model)")
    if run is not None:
        written = export_run(run, out, merge_lora=merge_lora, force=force)
    else:
        written = export_planned(model, plan, out, force=force)
    output.console.print(f"exported to {written}")


@command
def verify(
    folder: Annotated[Path, typer.Argument(help="An export folder.")],
):
    """Check every file of an export against its SHA-256 manifest."""
    from surgery.loading import verify_model

    output.console.print(f"{folder}: {verify_model(str(folder))} files match the manifest", soft_wrap=True)


@command
def generate(
    prompt: Annotated[str, typer.Option(help="Text prompt.")],
    model: opt.Model = "tiny",
    out: Annotated[Path, typer.Option(help="Video file to write (.mp4 or .gif; new, unless --force).")] = Path("video.mp4"),
    frames: opt.Frames = None,
    height: opt.Height = None,
    width: opt.Width = None,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = 20,
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
    plan: opt.TrainingFreePlan = None,
    image: opt.Image = None,
    force: opt.Force = False,
    verify: opt.Verify = False,
    cp: opt.ContextParallel = 1,
):
    """Generate a video with a (retrofitted) model (image-to-video: from --image)."""
    from surgery.evaluate import generate as run_generate

    with output.progress("sampling") as update:
        path, count = run_generate(model, prompt, out, frames=frames, height=height, width=width, steps=steps,
                                   seed=seed, force=force, verify=verify, progress=update, plan=plan, cp=cp,
                                   image=image)
    output.console.print(f"wrote {path} ({count} frames)")


@command(name="eval")
def eval_(
    student: Annotated[Optional[str], typer.Option(help="The student: an export folder (or any model spec).")] = None,
    teacher: opt.Model = "tiny",
    plan: opt.TrainingFreePlan = None,
    samples: Annotated[int, typer.Option(min=1, help="Seeded generations to compare.")] = 2,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of noise and text embeddings.")] = 0,
    image: opt.Image = None,
    verify: opt.Verify = False,
    cp: opt.ContextParallel = 1,
    json: opt.Json = False,
):
    """Compare a student with its teacher on the same seeds: velocity error, latent error, PSNR/SSIM."""
    from surgery.evaluate import evaluate

    with output.progress("sampling") as update:
        report = evaluate(student, teacher, plan=plan, samples=samples, steps=steps, seed=seed, verify=verify,
                          progress=update, cp=cp, image=image)
    output.print_json(report.to_dict()) if json else output.show_eval(report)


@command
def bench(
    model: opt.Model = "tiny",
    student: Annotated[Optional[str], typer.Option(help="The student: an export folder of --model.")] = None,
    plan: Annotated[Optional[Path], typer.Option(
        help="Or a plan applied to --model (training-free; learned variants run untrained, for speed only).")] = None,
    frames: opt.Frames = None,
    height: opt.Height = None,
    width: opt.Width = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed steps of each row (median reported).")] = 5,
    guidance: Annotated[bool, typer.Option(help="Two transformer calls a step (classifier-free guidance).")] = True,
    video: Annotated[bool, typer.Option(help="Also time whole generations (text encoder, steps, VAE decode).")] = False,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps of --video.")] = 50,
    compile: Annotated[bool, typer.Option(help="Compile both models' blocks (torch.compile).")] = False,
    cp: opt.ContextParallel = 1,
    json: opt.Json = False,
):
    """Time a denoising step (and with --video a whole video) of the stock model, the model with its attention
    core skipped (the ceiling) and the student, on this device."""
    from surgery.benchmark import benchmark

    report = benchmark(model, student=student, plan=plan, frames=frames, height=height, width=width, repeats=repeats,
                       guidance=guidance, video=video, video_steps=steps, compile=compile, cp=cp)
    output.print_json(report.to_dict()) if json else output.show_bench(report)


@command
def run(
    recipe: Annotated[str, typer.Option(help="A shipped recipe name or a .toml path.")] = "hybrid",
    budget: Annotated[Optional[float], typer.Option(help="Override the recipe's plan budget.")] = None,
    model: opt.Model = "tiny",
    out: Annotated[
        Path, typer.Option(help="Run folder to write; new or empty, unless --resume or --force.")
    ] = Path("runs/demo"),
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override one recipe field: section.key=value (repeatable).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out: its distillation, then export and eval.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier run in --out.")] = False,
    budget_per_expert: opt.BudgetPerExpert = False,
):
    """The main job: plan → distill → export → eval, ending with what it saved and what it cost."""
    from surgery.recipe import load_recipe
    from surgery.run import run_all

    overrides = list(set_ or []) + ([f"plan.budget={budget}"] if budget is not None else [])
    loaded = load_recipe(recipe, overrides)
    with output.resumable("run", out), output.training_progress() as progress:
        summary = run_all(model, loaded, out, resume=resume, force=force, budget_per_expert=budget_per_expert,
                          progress=progress)
    if summary is not None:  # None: a process of a launch other than the main one
        output.show_run(summary)


def main() -> None:
    app()
