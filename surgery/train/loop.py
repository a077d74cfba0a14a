"""The training loop both stages share: AdamW, warmup + cosine LR, clipping, metrics, checkpoints.

A step function does forward and backward and returns its metrics; the loop never knows which
variant, stage or loss it trains. Checkpoints hold the trainable tensors, the optimiser state and
the step, as safetensors + JSON (no pickle), written atomically; since every random draw derives
from (seed, step), resuming from one continues exactly as if the run had never stopped. A newest
checkpoint that cannot be read (a damaged disk, a copy cut short) gives way to the one before it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..errors import SurgeryError
from ..io import atomic_dir, atomic_write_text
from ..recipe import StageSettings

log = logging.getLogger("surgery")


class TrainingDiverged(SurgeryError):
    """A loss or gradient went NaN/inf; the last good checkpoint is kept."""


def save_checkpoint(folder: Path, step: int, params: dict[str, torch.Tensor], optimizer, extra: dict) -> None:
    """params: name → tensor to restore; optimizer: AdamW over `params` in the same order."""
    names = list(params)
    opt_tensors, opt_scalars = {}, {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                opt_tensors[f"{names[index]}::{key}"] = value.detach().cpu().contiguous()
            else:
                opt_scalars[f"{names[index]}::{key}"] = float(value)
    with atomic_dir(folder, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, tmp / "params.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer_scalars": opt_scalars, **extra}))


def load_checkpoint(folder: Path, params: dict[str, torch.nn.Parameter], optimizer) -> dict:
    """Restore params and AdamW state saved by `save_checkpoint`; returns the state JSON.
    Everything is read and checked before anything is restored, so a bad checkpoint changes nothing."""
    try:
        state = json.loads((folder / "state.json").read_text())
        saved = load_file(folder / "params.safetensors")
        opt_tensors = load_file(folder / "optimizer.safetensors")
        state["step"], state["optimizer_scalars"] = int(state["step"]), dict(state["optimizer_scalars"])
    except Exception as e:
        raise SurgeryError(f"cannot read checkpoint {folder}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if set(saved) != set(params) or any(saved[n].shape != p.shape for n, p in params.items()):
        raise SurgeryError(f"checkpoint {folder} does not match the run's trainable parameters")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])
    opt_state = {}
    for index, name in enumerate(params):
        entry = {}
        for key in ("exp_avg", "exp_avg_sq"):
            if f"{name}::{key}" in opt_tensors:
                entry[key] = opt_tensors[f"{name}::{key}"].to(params[name].device)
        if f"{name}::step" in state["optimizer_scalars"]:
            entry["step"] = torch.tensor(state["optimizer_scalars"][f"{name}::step"])
        if entry:
            opt_state[index] = entry
    full = optimizer.state_dict()
    full["state"] = opt_state
    optimizer.load_state_dict(full)
    return state


def checkpoints_newest_first(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("step-*") if p.name.split("-")[1].isdigit()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def latest_checkpoint(folder: Path) -> Path | None:
    found = checkpoints_newest_first(folder)
    return found[0] if found else None


def restore_newest_readable(folder: Path, params: dict[str, torch.nn.Parameter], optimizer) -> int:
    """Restore the newest checkpoint in `folder` that reads back whole, saying so for each one skipped;
    returns its step (0: none, the stage starts over — every draw derives from (seed, step), so the
    result is the same, only later)."""
    skipped = []
    for checkpoint in checkpoints_newest_first(folder):
        try:
            step = load_checkpoint(checkpoint, params, optimizer)["step"]
        except SurgeryError as e:
            skipped.append(checkpoint)
            log.warning("%s; falling back to the checkpoint before it", e)
            continue
        if skipped:
            log.warning("resuming from %s", checkpoint)
        return step
    if skipped:
        log.warning("no readable checkpoint in %s; the stage starts over", folder)
    return 0


def run_stage(
    name: str,
    params: dict[str, torch.nn.Parameter],
    step_fn: Callable[[int], dict],
    schedule: StageSettings,
    checkpoints: Path,
    metrics_path: Path,
    checkpoint_every: int,
    accelerator=None,
    progress: Callable[[str, int, int, dict], None] | None = None,
    stop_after: int | None = None,
    sync_grads: bool = False,
    lr_scales: dict[str, float] | None = None,
) -> tuple[dict, int]:
    """Train `params` for `schedule.steps` steps; resumes from the newest checkpoint in `checkpoints`.

    step_fn(step) runs forward + backward and returns metrics with a scalar "loss".
    stop_after: stop (with a checkpoint) after this many steps in this call, as an interruption would.
    sync_grads: average gradients over processes here, for parameters that no DDP wrapper syncs.
    lr_scales: parameter name → factor on the schedule's lr (default 1); one AdamW group per factor.
    Returns the last step's metrics and how many steps this call ran.
    """
    scales = {name: (lr_scales or {}).get(name, 1.0) for name in params}
    factors = sorted(set(scales.values()))
    # Parameters in group order, so that index i of the optimiser's state is the i-th name (checkpoints).
    params = {name: params[name] for factor in factors for name in params if scales[name] == factor}
    groups = [{"params": [p for n, p in params.items() if scales[n] == factor], "lr_scale": factor} for factor in factors]
    optimizer = torch.optim.AdamW(groups, lr=schedule.lr, weight_decay=schedule.weight_decay)
    if accelerator is not None:
        optimizer = accelerator.prepare(optimizer)
    start = restore_newest_readable(checkpoints, params, optimizer)
    if accelerator is None or accelerator.is_main_process:
        _trim_metrics(metrics_path, name, start)
    metrics: dict = {}
    done_here = 0
    if stop_after is not None and stop_after <= 0 and start < schedule.steps:
        raise StopRequested(start)
    for step in range(start, schedule.steps):
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step) * group["lr_scale"]
        metrics = step_fn(step)
        if sync_grads and accelerator is not None and accelerator.num_processes > 1:
            for param in params.values():
                if param.grad is not None:
                    param.grad = accelerator.reduce(param.grad, reduction="mean")
        grads = [p.grad for p in params.values() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), schedule.grad_clip) if grads else None
        if not math.isfinite(metrics["loss"]) or (grad_norm is not None and not torch.isfinite(grad_norm)):
            kept = latest_checkpoint(checkpoints)
            raise TrainingDiverged(
                f"{name}: loss became {metrics['loss']} at step {step}; "
                f"last good checkpoint: {kept if kept else 'none (diverged before the first)'}"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = {"stage": name, "step": step + 1, "lr": schedule.lr_at(step), **metrics,
                   "seconds": time.perf_counter() - began}
        if accelerator is None or accelerator.is_main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if progress:
            progress(name, step + 1, schedule.steps, metrics)
        done_here += 1
        finished = step + 1 == schedule.steps
        stopping = stop_after is not None and done_here >= stop_after
        if (step + 1) % checkpoint_every == 0 or finished or stopping:
            if accelerator is None or accelerator.is_main_process:
                save_checkpoint(checkpoints / f"step-{step + 1:06d}", step + 1, params, optimizer, {"stage": name})
                for old in sorted(checkpoints.glob("step-*"))[:-2]:  # keep the two newest
                    _remove(old)
        if stopping and not finished:
            raise StopRequested(step + 1)
    return metrics, done_here


def stage_progress(progress: Callable[[str, int, int, dict], None] | None, stage: str):
    """A `(done, total)` callback (calibration, sampling) that reports to a run's `progress(stage, step,
    total, metrics)` as steps of `stage` without metrics; None without progress."""
    return None if progress is None else (lambda done, total: progress(stage, done, total, {}))


class StopRequested(Exception):
    """Raised by `stop_after`: the run stopped cleanly after a checkpoint."""

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step}")
        self.step = step


def _trim_metrics(path: Path, stage: str, step: int) -> None:
    """Forget metrics logged after the step we start from (those steps run again) and any line a kill
    cut short while it was being appended."""
    if not path.exists():
        return
    keep = []
    for line in filter(str.strip, path.read_text().splitlines()):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: dropped a line cut short by an interruption", path)
            continue
        if not (entry["stage"] == stage and entry["step"] > step):
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
