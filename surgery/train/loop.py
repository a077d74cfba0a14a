"""The training loop both stages share: AdamW, warmup + cosine LR, clipping, metrics, checkpoints.

A step function does forward and backward and returns its metrics; the loop never knows which
variant, stage or loss it trains. Checkpoints hold the trainable tensors, the optimiser state and
the step, as safetensors + JSON (no pickle), written atomically; since every random draw derives
from (seed, step), resuming from one continues exactly as if the run had never stopped. A newest
checkpoint that cannot be read (a damaged disk, a copy cut short) gives way to the one before it.

Sharded parameters (FSDP2's DTensors) are saved sharded: every process writes its own shards through
torch's distributed checkpoint (safetensors files that record each shard's offsets). Every checkpoint
is read back through it, whatever wrote it, into the layout of the processes that read it, so a run
resumes on another process count or strategy.
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
from safetensors.torch import save_file

from ..errors import SurgeryError
from ..io import atomic_dir, atomic_write_text
from ..parallel import local
from ..recipe import StageSettings

log = logging.getLogger("surgery")


class TrainingDiverged(SurgeryError):
    """A loss or gradient went NaN/inf; the last good checkpoint is kept."""


def _sharded(tensors) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in tensors)


def save_checkpoint(folder: Path, step: int, params: dict[str, torch.Tensor], optimizer, extra: dict,
                    main: bool = True) -> None:
    """params: name → tensor to restore; optimizer: AdamW over `params` in the same order. Whole tensors are
    written by the main process alone; sharded ones by every process (all must call it; `main`: whether
    this is the main one)."""
    names = list(params)
    opt_tensors, opt_scalars = {}, {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                opt_tensors[f"{names[index]}::{key}"] = value.detach()
            else:
                opt_scalars[f"{names[index]}::{key}"] = float(value)
    state = json.dumps({"step": step, "optimizer_scalars": opt_scalars, **extra})
    if _sharded(params.values()):
        _save_sharded(folder, {**{k: v.detach() for k, v in params.items()}, **opt_tensors}, state, main)
        return
    if not main:
        return
    with atomic_dir(folder, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, tmp / "params.safetensors")
        save_file({k: v.cpu().contiguous() for k, v in opt_tensors.items()}, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(state)


def _save_sharded(folder: Path, tensors: dict[str, torch.Tensor], state: str, main: bool) -> None:
    """Every process writes its shards into the main process's temporary folder, which then takes the
    checkpoint's name: a kill in between leaves no half-written checkpoint under it."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    def write(tmp: Path) -> None:
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True))

    if main:
        with atomic_dir(folder, overwrite=True) as tmp:
            dist.broadcast_object_list([str(tmp)], src=0)
            write(tmp)
            (tmp / "state.json").write_text(state)
    else:
        where = [None]
        dist.broadcast_object_list(where, src=0)
        write(Path(where[0]))
    dist.barrier()  # the checkpoint has its name before any process goes on (and may remove an older one)


def load_checkpoint(folder: Path, params: dict[str, torch.nn.Parameter], optimizer) -> dict:
    """Restore params and AdamW state saved by `save_checkpoint`, whole or sharded, into the layout of
    `params` (whole tensors, or this process's shards); returns the state JSON. A collective for sharded
    params. Everything is read and checked before anything is restored, so a bad checkpoint
    changes nothing."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    try:
        state = json.loads((folder / "state.json").read_text())
        state["step"], state["optimizer_scalars"] = int(state["step"]), dict(state["optimizer_scalars"])
        stored = HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    except Exception as e:
        raise SurgeryError(f"cannot read checkpoint {folder}: {_first_line(e)}") from None
    saved_params = {name: meta.size for name, meta in stored.items() if "::" not in name}
    if set(saved_params) != set(params) or any(saved_params[n] != p.shape for n, p in params.items()):
        raise SurgeryError(f"checkpoint {folder} does not match the run's trainable parameters")
    # Read into new tensors of the params' layout (a shard of each where they are sharded).
    read = {name: torch.zeros_like(param.detach()) for name, param in params.items()}
    read |= {key: torch.zeros_like(params[key.split("::")[0]].detach()) for key in stored if "::" in key}
    try:
        # Whole tensors: each process reads on its own (no collective, as in a planner's private run).
        dcp.load(read, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=not _sharded(read.values()))
    except Exception as e:
        raise SurgeryError(f"cannot read checkpoint {folder}: {_first_line(e)}") from None
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(read[name])
    opt_state = {}
    for index, name in enumerate(params):
        entry = {}
        for key in ("exp_avg", "exp_avg_sq"):
            if f"{name}::{key}" in read:
                entry[key] = read[f"{name}::{key}"]
        if f"{name}::step" in state["optimizer_scalars"]:
            entry["step"] = torch.tensor(state["optimizer_scalars"][f"{name}::step"])
        if entry:
            opt_state[index] = entry
    full = optimizer.state_dict()
    full["state"] = opt_state
    optimizer.load_state_dict(full)
    return state


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


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
        if accelerator is not None and accelerator.num_processes > 1:
            metrics = _over_processes(metrics, accelerator)
            if sync_grads:
                for param in params.values():
                    if param.grad is not None:
                        param.grad = accelerator.reduce(param.grad, reduction="mean")
        grads = [p.grad for p in params.values() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), schedule.grad_clip) if grads else None
        grad_norm = None if grad_norm is None else local(grad_norm)  # sharded gradients: the norm of the whole
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
        if torch.cuda.is_available():
            metrics["peak_memory_gib"] = _peak_memory_gib(accelerator)
        if accelerator is None or accelerator.is_main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if progress and (accelerator is None or accelerator.is_main_process):
            progress(name, step + 1, schedule.steps, metrics)
        done_here += 1
        finished = step + 1 == schedule.steps
        stopping = stop_after is not None and done_here >= stop_after
        if (step + 1) % checkpoint_every == 0 or finished or stopping:
            main = accelerator is None or accelerator.is_main_process
            save_checkpoint(checkpoints / f"step-{step + 1:06d}", step + 1, params, optimizer, {"stage": name}, main)
            if main:
                for old in sorted(checkpoints.glob("step-*"))[:-2]:  # keep the two newest
                    _remove(old)
        if stopping and not finished:
            raise StopRequested(step + 1)
    return metrics, done_here


def _over_processes(metrics: dict, accelerator) -> dict:
    """A step's metrics over the global batch: every process's numbers averaged (its sample counts summed),
    so the main process logs what one process running the whole batch would, and every process sees the
    same loss (a NaN on one stops them all)."""
    flat = [(key, sub) for key, value in metrics.items()
            for sub in (value if isinstance(value, dict) else [None])]
    values = torch.tensor([float(metrics[k] if s is None else metrics[k][s]) for k, s in flat], dtype=torch.float64,
                          device=accelerator.device)
    total = accelerator.reduce(values, reduction="sum").tolist()
    out: dict = {}
    for (key, sub), value in zip(flat, total):
        value = int(value) if key == "samples" else value / accelerator.num_processes
        if sub is None:
            out[key] = value
        else:
            out.setdefault(key, {})[sub] = value
    return out


def _peak_memory_gib(accelerator) -> float:
    """The largest peak of allocated GPU memory over the processes since they started, GiB."""
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device="cuda")
    if accelerator is not None and accelerator.num_processes > 1:
        peak = accelerator.gather(peak)
    return peak.max().item()


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
