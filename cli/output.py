"""All terminal output: rich tables and --json. The library never prints."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys

from rich.console import Console
from rich.table import Table

# In a multi-process launch (torchrun and `accelerate launch` set RANK) only the main process prints:
# the others run the same steps and would repeat every line, bar and error.
_QUIET = int(os.environ.get("RANK", "0")) != 0
console = Console(quiet=_QUIET)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, quiet=_QUIET)


def fail(message: str, code: int = 2):
    """One line on stderr, then exit: the contract for bad input."""
    import typer

    err_console.print(f"error: {message}", markup=False)
    raise typer.Exit(code)


def interrupted(hint: str | None = None):
    """Ctrl-C: one line on stderr (with how to continue, where there is a way) and the usual exit code 130."""
    import typer

    err_console.print("interrupted" + (f"; {hint}" if hint else ""), markup=False)
    raise typer.Exit(130)


@contextlib.contextmanager
def resumable(command: str, out):
    """On Ctrl-C inside the block, say how to continue once the run folder `out` holds a run."""
    from pathlib import Path

    try:
        yield
    except KeyboardInterrupt:
        if (Path(out) / "run.json").is_file():
            interrupted(f"continue with: vsurgery {command} --out {shlex.quote(str(out))} --resume")
        raise


class _WarningLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        err_console.print(f"warning: {record.getMessage()}", markup=False)


def show_library_warnings() -> None:
    """Print the library's warnings (logger "surgery": a damaged checkpoint skipped, …) as lines on stderr."""
    logger = logging.getLogger("surgery")
    if not any(isinstance(handler, _WarningLines) for handler in logger.handlers):
        logger.addHandler(_WarningLines(logging.WARNING))


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def human_flops(flops: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOP"


def key_value_table(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def show_info(info) -> None:
    grid = info.grid
    key_value_table(
        f"{info.model} (config {info.fingerprint})",
        [
            ("layers", str(info.layers)),
            ("heads × head_dim", f"{info.heads} × {info.head_dim} (dim {info.dim})"),
            ("grid (T×H×W)", f"{grid['frames']}×{grid['height']}×{grid['width']}"),
            ("tokens", f"{info.tokens:,}"),
            ("text tokens", str(info.text_tokens)),
            ("self-attention FLOPs / layer", human_flops(info.self_attention_flops_per_layer)),
            ("self-attention FLOPs / forward", human_flops(info.self_attention_flops)),
            ("forward FLOPs", human_flops(info.forward_flops)),
            ("self-attention share", f"{info.self_attention_share:.1%}"),
            ("latent channels, VAE scale", f"{info.latent_channels}, {'×'.join(map(str, info.vae_scale))}"),
            ("image input", f"{info.image}" + (f" ({info.image_tokens} CLIP tokens)" if info.image_tokens else "")
             if info.image else "none (text to video)"),
            *[(f"expert {name}", f"{e['layers']} layers, timesteps {e['timesteps'][0]:g}–{e['timesteps'][1]:g}, "
                                 f"self-attention {human_flops(e['self_attention_flops'])} / forward")
              for name, e in info.experts.items() if len(info.experts) > 1],
        ],
    )


def show_expert_plans(plans, path, seconds: float) -> None:
    for name, plan in plans.plans.items():
        console.print(f"[bold]{name}[/bold]")
        show_plan(plan)
    served = plans.meta["steps_served"]
    console.print(
        f"two experts switched at boundary ratio {plans.boundary_ratio:g}: of {served['steps']} steps "
        f"(flow shift {served['shift']:g}) transformer serves {served['transformer']}, transformer_2 "
        f"{served['transformer_2']}; attention FLOPs over the sampling run {plans.meta['flops_ratio']:.1%} of dense "
        f"(budget {plans.budget:g} {plans.meta['budget_scope'] == 'per expert' and 'per expert' or 'for the run'}); "
        f"planned in {seconds:.0f} s"
    )
    console.print(f"wrote {path}", soft_wrap=True)


@contextlib.contextmanager
def progress(description: str):
    """Yield a `(done, total)` callback that drives a transient rich progress bar on stderr.

    The bar starts at the first update, so input errors raised before any work print alone.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True,
    )
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description, total=total)
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()


def _changed_settings(config) -> str:
    """The settings that differ from the variant's defaults, compactly."""
    import dataclasses

    parts = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if value is None or value == default:
            continue
        parts.append(f"{f.name}={value:.3g}" if isinstance(value, float) else f"{f.name}={value}")
    return ", ".join(parts)


def show_plan(plan, path=None, seconds: float | None = None) -> None:
    data = plan.to_dict()
    title = f"plan for {plan.model} at grid {plan.grid} ({plan.grid.tokens:,} tokens), budget {plan.budget:g}"
    table = Table(title=title, title_justify="left")
    for column in ("layer", "variant", "params", "FLOPs", "of dense", "error"):
        table.add_column(column, justify="right" if column in ("FLOPs", "of dense", "error") else "left")
    dense_layer = data["dense_flops"] / plan.num_layers
    for fqn, choice in plan.layers.items():
        params = _changed_settings(choice.config)
        table.add_row(
            fqn, choice.variant, params or "—", human_flops(choice.flops), f"{choice.flops / dense_layer:.1%}",
            f"{choice.error:.4f}",
        )
    console.print(table)
    solver = data["solver"]
    dense_steps = data.get("dense_steps")
    if dense_steps:
        flops = (f"attention FLOPs of a planned step: {human_flops(data['flops'])} = "
                 f"{dense_steps['planned_steps_flops_ratio']:.1%} of dense ({human_flops(data['dense_flops'])}); the "
                 f"first {dense_steps['steps']} of {dense_steps['of']} steps dense (timesteps ≥ "
                 f"{plan.dense_boundary * 1000:.0f}): {data['flops_ratio']:.1%} of dense over the sampling run")
    else:
        flops = (f"attention FLOPs: {human_flops(data['flops'])} = {data['flops_ratio']:.1%} of dense "
                 f"({human_flops(data['dense_flops'])})")
    console.print(f"{flops}; total error {data['total_error']:.4f}; "
                  f"optimality gap ≤ {solver['optimality_gap']:.2g} ({solver['method']})")
    console.print(f"errors: {data['calibration']['errors']}" + (f"; planned in {seconds:.0f} s" if seconds else ""))
    latency = data.get("latency")
    if latency:
        console.print(
            f"predicted step on {latency['device']} ({latency['timing']}"
            f"{', compiled' if latency.get('compiled') else ''}): {latency['predicted_step_ms']:.1f} ms "
            f"against {latency['stock_step_ms']:.1f} ms stock = {latency['predicted_speedup']:.2f}× "
            f"(attention-free floor {latency['skipped_attention_step_ms']:.1f} ms)"
            + (f"; over the sampling run with its dense steps {latency['predicted_run_speedup']:.2f}×"
               if "predicted_run_speedup" in latency else "")
        )
    if path is not None:
        from surgery.plan import stage1_weights_path

        console.print(f"wrote {path}" + (f" and {stage1_weights_path(path)}" if plan.stage1 else ""))


@contextlib.contextmanager
def training_progress():
    """Yield `progress(stage, step, total, metrics)` that drives one rich bar per stage with loss and speed
    (a step without a loss, as calibration's and eval's, shows the bar alone)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
        console=err_console,
    )
    tasks: dict[str, int] = {}

    def update(stage: str, step: int, total: int, metrics: dict) -> None:
        if stage not in tasks:
            if not tasks:
                bar.start()
            tasks[stage] = bar.add_task(stage, total=total, detail="")
        detail = ""
        if "loss" in metrics:
            speed = metrics.get("samples", 1) / max(metrics.get("seconds", 0.0), 1e-9)
            detail = f"loss {metrics['loss']:.4g}  {speed:.2f} samples/s"
        bar.update(tasks[stage], completed=step, detail=detail)

    try:
        yield update
    finally:
        if tasks:
            bar.stop()


def show_distill(summary) -> None:
    table = Table(title=f"run {summary.run}", title_justify="left")
    # "uniform": the same L1 loss for uniform attention (every query gets the mean of v), the yardstick.
    for column in ("layer", "stage-1 first", "last", "fell by", "uniform", "last vs uniform"):
        table.add_column(column, justify="left" if column == "layer" else "right", no_wrap=column == "layer")
    uniform = summary.stage1_uniform_attention
    for fqn, (first, last) in summary.stage1_losses.items():
        baseline = uniform.get(fqn)
        table.add_row(fqn, f"{first:.4g}", f"{last:.4g}", f"{first / max(last, 1e-30):.1f}×",
                      "—" if baseline is None else f"{baseline:.4g}",
                      "—" if baseline is None else f"{baseline / max(last, 1e-30):.1f}× below")
    if summary.stage1_losses:
        console.print(table)
    if summary.stage2_final_loss is not None:
        console.print(f"stage-2 final loss {summary.stage2_final_loss:.4g}")
    console.print(f"student written to {summary.run}/student.safetensors")


def show_eval(report) -> None:
    key_value_table(
        f"student {report.student} vs teacher {report.teacher} ({report.samples} seeds, {report.steps} steps)",
        [
            ("velocity error per step", ", ".join(f"{e:.3g}" for e in report.velocity_error_per_step)),
            ("velocity error, mean", f"{report.velocity_error_mean:.4g}"),
            ("final latent relative error", f"{report.final_latent_rel_error:.4g}"),
            (f"PSNR ({report.compared_on})", f"{report.psnr_db:.2f} dB"),
            (f"SSIM ({report.compared_on})", f"{report.ssim:.4f}"),
        ],
    )


def show_run(summary) -> None:
    for distilled in summary.distill.values() if isinstance(summary.distill, dict) else [summary.distill]:
        show_distill(distilled)
    show_eval(summary.eval)
    counts: dict[str, int] = {}
    for variant in summary.variants.values():
        counts[variant] = counts.get(variant, 0) + 1
    layers = ", ".join(f"{n}× {v}" for v, n in counts.items())
    console.print(
        f"[bold]attention FLOPs saved: {summary.attention_flops_saved:.1%}[/bold] "
        f"(budget {summary.budget:g}; layers: {layers}); student vs teacher: final-latent error "
        f"{summary.eval.final_latent_rel_error:.3g}, PSNR {summary.eval.psnr_db:.1f} dB; "
        f"exported to {summary.exported}"
    )


def show_bench(report) -> None:
    grid = report.grid
    title = (f"{report.student} vs {report.model} on {report.device}, {grid['frames']}×{grid['height']}×{grid['width']} "
             f"({report.tokens:,} tokens), {report.dtype}{', compiled' if report.compiled else ''}")
    table = Table(title=title, title_justify="left")
    video = report.video_steps is not None
    columns = ["", f"step ms (median of {report.repeats})", "speedup", "peak GiB"]
    columns += [f"video s ({report.video_steps} steps)", "video speedup"] if video else []
    for column in columns:
        table.add_column(column, justify="left" if not column else "right")
    for row in report.rows:
        cells = [row.name, f"{row.step_ms:.1f}", f"{row.speedup:.2f}×",
                 "—" if row.peak_memory_gib is None else f"{row.peak_memory_gib:.1f}"]
        if video:
            cells += ["—", "—"] if row.video_s is None else [f"{row.video_s:.1f}", f"{row.video_speedup:.2f}×"]
        table.add_row(*cells)
    console.print(table)
    predicted = "" if report.predicted_speedup is None else f"; the plan predicted {report.predicted_speedup:.2f}×"
    saved = "" if report.saving_share is None else f"; {report.saving_share:.0%} of the possible time saved"
    console.print(
        f"converted self-attention layers: {report.converted_layers}; attention FLOPs {report.attention_flops_ratio:.1%} "
        f"of dense; ceiling (attention free) {report.ceiling_speedup:.2f}×; ideal at these FLOPs "
        f"{report.ideal_speedup:.2f}×, reached {report.of_ideal:.0%}{saved}{predicted}"
    )
    for note in report.notes:
        console.print(f"note: {note}")
