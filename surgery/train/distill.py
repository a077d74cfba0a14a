"""`distill`: plan (or read a plan), attention transfer against the frozen teacher, then fine-tuning.

Stage 1 (Attention Surgery's value-based distillation): the teacher runs dense attention; at every
converted layer the student's new attention gets the teacher's own q, k, v and input and is
trained so its output matches the teacher's attention output y under ‖y − ŷ‖₁. Each layer's loss
is backpropagated inside the teacher's forward, so only one layer's activations live at a time;
only the new attention parameters (feature maps, gates) train. Layers with nothing to learn
(e.g. VMoBA) sit stage 1 out.

Stage 2: the whole student, end to end, against the teacher's predicted velocity on the same noisy
input (and/or flow matching on data), with LoRA through peft or full fine-tuning.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..swap import apply, check_plan, self_attention_modules, variant_processors
from ..errors import SurgeryError
from ..io import atomic_save_safetensors, atomic_write_json, check_output_folder
from ..lock import LOCK_NAME, check_not_busy, folder_lock
from ..loading import load_model
from ..model import check_expert, conditioner, default_text_tokens, model_kind, resolve_grid, timestep_band
from ..plan import Plan
from ..recipe import Recipe
from ..recipe import parse as parse_recipe
from ..data import StepSampler, build_dataset, split_batch
from ..parallel import full_state_dict, is_sharded, shard
from ..variants import VARIANTS
from ..wan import layer_index, self_attention_fqn
from .loop import run_stage, stage_progress
from .transfer import attention_transfer_fn, loss_ends


def _accelerator(recipe: Recipe):
    from accelerate import Accelerator

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # accelerate would wrap the student its own way while the recipe shards teacher and student (surgery.parallel).
        raise SurgeryError("this accelerate config turns FSDP on; distill takes its strategy from the recipe: launch "
                           "with a config that only sets processes (configs/accelerate/) and set parallel.strategy")
    on_gpu = torch.cuda.is_available()
    return Accelerator(cpu=not on_gpu, mixed_precision=recipe.train.mixed_precision if on_gpu else "no")


def build_student(teacher, plan: Plan, recipe: Recipe, stage: int):
    """A copy of the teacher with the plan applied; from stage 2 on, with LoRA if the recipe says so."""
    student = apply(copy.deepcopy(teacher), plan)
    student.requires_grad_(False)
    for processor in variant_processors(student).values():
        processor.requires_grad_(True)
    if stage == 2:
        if recipe.stage2.mode == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            config = LoraConfig(
                r=recipe.stage2.lora_rank, lora_alpha=recipe.stage2.lora_alpha,
                target_modules=recipe.stage2.lora_targets,
            )
            inject_adapter_in_model(config, student)  # lora_* parameters train, base weights stay frozen
            for processor in variant_processors(student).values():
                processor.requires_grad_(True)
        else:
            student.requires_grad_(True)
        if recipe.train.gradient_checkpointing:
            student.enable_gradient_checkpointing()
    return student


def stage1_trainees(teacher, plan: Plan) -> torch.nn.Module:
    """The planned layers' processors, built on the teacher's attention, in a module whose parameter names are
    the student's (`blocks.N.attn1.processor.*`): what stage 1 trains, without a copy of a sharded teacher."""
    holder = torch.nn.Module()
    holder.blocks = torch.nn.ModuleList(torch.nn.Module() for _ in teacher.blocks)
    attention = self_attention_modules(teacher)
    for block in holder.blocks:
        block.attn1 = torch.nn.Module()
        block.attn1.processor = None
    for fqn, choice in plan.layers.items():
        index = layer_index(fqn)
        holder.blocks[index].attn1.processor = VARIANTS[choice.variant].from_dense(attention[fqn], choice.config, index)
    return holder.float().requires_grad_(True)  # fp32 master weights, whatever the teacher's dtype


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def stage1_step_fn(teacher, student, sampler, device, dtype):
    """step(i) for stage 1: one teacher forward whose taps train each converted layer (L1 on outputs).
    Also returns {layer index: processor} of the layers that have parameters to train."""
    processors = {
        layer_index(f): p for f, p in variant_processors(student).items()
        if any(True for _ in p.parameters())
    }
    transfer = attention_transfer_fn(teacher, {i: [p] for i, p in processors.items()}, sampler, device, dtype)

    def step(step_index: int) -> dict:
        losses, uniform, samples = transfer(step_index)
        per_layer = {self_attention_fqn(i): losses[i][0] for i in sorted(losses)}
        return {"loss": sum(per_layer.values()) / max(1, len(per_layer)), "layers": per_layer,
                "uniform_attention": {self_attention_fqn(i): uniform[i] for i in sorted(uniform)},
                "samples": samples}

    return step, processors


def stage2_step_fn(teacher, student, sampler, recipe: Recipe, device, dtype, plan: Plan, accelerator):
    """step(i) for stage 2: student forward and backward against the teacher's velocity and/or the data."""
    stage2 = recipe.stage2
    targets = {fqn: choice.config for fqn, choice in plan.layers.items()}

    def step(step_index: int) -> dict:
        if stage2.sparsity_anneal is not None:
            _anneal_sparsity(student, targets, stage2.sparsity_anneal, step_index)
        batch = sampler.batch(step_index, device, dtype)
        with accelerator.autocast():
            prediction = student(hidden_states=batch.inputs, timestep=batch.timestep,
                                 encoder_hidden_states=batch.text, encoder_hidden_states_image=batch.image).sample.float()
            loss = prediction.new_zeros(())
            metrics = {}
            if stage2.distill_weight:
                with torch.no_grad():
                    target = teacher(hidden_states=batch.inputs, timestep=batch.timestep, encoder_hidden_states=batch.text,
                                     encoder_hidden_states_image=batch.image).sample.float()
                distill = torch.nn.functional.mse_loss(prediction, target)
                loss = loss + stage2.distill_weight * distill
                metrics["velocity_distill"] = distill.item()
            if stage2.flow_weight:
                flow = torch.nn.functional.mse_loss(prediction, (batch.noise - batch.clean).float())
                loss = loss + stage2.flow_weight * flow
                metrics["flow_matching"] = flow.item()
        accelerator.backward(loss)
        return {"loss": loss.item(), **metrics, "samples": batch.inputs.shape[0]}

    return step


def _anneal_sparsity(student, targets, anneal, step: int) -> None:
    """Raise each layer's sparsity from `start` by `step` every `every` steps, up to its planned value."""
    for fqn, processor in variant_processors(student).items():
        planned = getattr(targets[fqn], "sparsity", None)
        if planned is None:
            continue
        current = min(planned, anneal.start + anneal.step * (step // anneal.every))
        processor.config = dataclasses.replace(processor.config, sparsity=current)


@dataclass
class DistillSummary:
    """What a distill run did: the numbers `vsurgery distill` prints."""

    run: str
    attention_flops_ratio: float | None  # the plan's attention FLOPs over dense
    stage1_final_loss: float | None = None
    stage2_final_loss: float | None = None
    # Per converted layer: the stage-1 loss at the start and the end (each the mean over a tenth of the steps).
    stage1_losses: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Per layer: the same loss for uniform attention (every query gets the mean value), the yardstick.
    stage1_uniform_attention: dict[str, float] = field(default_factory=dict)


@dataclass
class OpenRun:
    """A run folder ready to train: what it trains (model spec, recipe, plan) and against what."""

    out: Path
    spec: str
    recipe: Recipe
    plan: Plan
    teacher: torch.nn.Module
    dataset: object  # a `datasets.Dataset` of latents and text embeddings
    accelerator: object

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def sharded(self) -> bool:
        return is_sharded(self.recipe, self.accelerator)

    def sampler(self, stage: int) -> StepSampler:
        acc = self.accelerator
        return StepSampler(self.dataset, self.recipe.data.batch_size, self.recipe.train.seed, stage,
                           acc.process_index, acc.num_processes, conditioner(dict(self.teacher.config)),
                           band=timestep_band(self.spec, self.plan.dense_boundary),
                           timestep_shift=self.recipe.data.timestep_shift)


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SurgeryError(f"cannot read {what} {path}: {e}") from None


def is_run_folder(folder: Path) -> bool:
    return (folder / "run.json").is_file()


def check_run_folder(out: Path, resume: bool, force: bool) -> None:
    """Refuse, before any work, a run folder that cannot be used: for a new run a file in its place, a
    non-empty folder (without `force`: an earlier run folder is then replaced), no write access; for
    `resume` anything but an unfinished run folder."""
    if resume and force:
        raise SurgeryError("--resume continues the run in --out and --force replaces it: pass one of them")
    check_not_busy(out)
    if not resume:
        check_output_folder(out, force=force, replaceable=is_run_folder, what="a run folder", ignore=(LOCK_NAME,),
                            alternative=", or --resume to continue it")
        return
    if saved_run(out)[0].get("finished"):
        raise SurgeryError(f"--resume: the run in {out} already finished")
    check_output_folder(out, force=True)  # the folder's files stay: only its write access is checked


def saved_run(out: Path) -> tuple[dict, Recipe]:
    """A run folder's run.json and recipe: what a resumed run continues with."""
    if not is_run_folder(out):
        raise SurgeryError(f"--resume: {out} is not a run folder (no run.json)")
    info = _read_json(out / "run.json", "run info")
    return info, parse_recipe(_read_json(out / "recipe.json", "recipe"), f"{out}/recipe.json")


def open_run(spec: str, recipe: Recipe, out: Path, plan: Plan | None, resume: bool, force: bool = False,
             progress=None) -> OpenRun:
    """A new run (planned, checked, then written) or a resumed one (its own recipe and plan).

    Everything that can reject the input — the folder, the plan against the teacher, the data
    source — runs before a new folder is written (or, with `force`, an earlier run in it removed),
    so a rejected run leaves nothing behind. The caller holds the folder's lock (`distill` does).
    progress: as `distill`'s; planning reports as stage "calibrating".
    """
    check_run_folder(out, resume, force)
    if resume:
        # The run's own model, recipe and plan: a resumed run continues exactly what was started.
        run_info, recipe = saved_run(out)
        spec = run_info["model"]
        plan = Plan.load(out / "plan.json")

    # Before the processes meet: every one of them rejects a batch that does not split over the launch.
    split_batch(recipe.data.batch_size, int(os.environ.get("WORLD_SIZE", "1")))
    accelerator = _accelerator(recipe)
    accelerator.wait_for_everyone()  # every process has checked `out` before the main one writes to it
    torch.manual_seed(recipe.train.seed)
    sharded = is_sharded(recipe, accelerator)
    teacher = load_model(spec, dtype=_sharded_dtype(recipe, accelerator))
    if not sharded or plan is None:  # sharding moves a teacher block by block; planning needs it whole on the device
        teacher.to(accelerator.device)
    teacher.requires_grad_(False)
    if plan is None:
        plan = _plan_for(spec, recipe, teacher, stage_progress(progress, "calibrating"))
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            # Every process plans the same way at once; all then take the main one's, so rounding can't split them.
            plan = broadcast_object_list([plan])[0]
    check_plan(teacher, plan)  # a plan for another model is rejected before anything is written
    check_expert(plan, spec)
    grid = plan.grid or resolve_grid(spec, dict(teacher.config))
    dataset = build_dataset(recipe.data, dict(teacher.config), grid, default_text_tokens(spec), recipe.train.seed,
                            model_kind(spec).image_tokens)
    if sharded:
        shard(teacher, accelerator, bf16=_bf16(recipe, accelerator))  # frozen: gathered per block, freed after it
    if not resume and accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for entry in out.iterdir():  # with `force`, the earlier run's files (the lock stays)
            if entry.name != LOCK_NAME:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        atomic_write_json(out / "recipe.json", recipe.to_dict())
        plan.save(out / "plan.json")
        atomic_write_json(out / "run.json", {"model": spec, "recipe": recipe.name, "finished": False,
                                             "stage2_mode": recipe.stage2.mode})
    return OpenRun(out, spec, recipe, plan, teacher, dataset, accelerator)


def _bf16(recipe: Recipe, accelerator) -> bool:
    return recipe.train.mixed_precision == "bf16" and accelerator.device.type == "cuda"


def _sharded_dtype(recipe: Recipe, accelerator) -> torch.dtype | None:
    """bf16 weights for sharded bf16 runs (blocks compute in bf16 anyway; `shard` keeps trainable ones fp32):
    every process builds the whole model before sharding it, so this halves each one's host memory."""
    return torch.bfloat16 if is_sharded(recipe, accelerator) and _bf16(recipe, accelerator) else None


def _plan_for(spec: str, recipe: Recipe, teacher, progress=None) -> Plan:
    """The recipe's plan: a plan file it names, or one made now for its budget (progress(done, total))."""
    if recipe.plan.path:
        return Plan.load(recipe.plan.path)
    from ..planner import make_plan
    from .distilled_errors import recipe_plan_options

    return make_plan(spec, recipe.plan.budget, model=teacher, **recipe_plan_options(recipe, progress))


def train_stage1(run: OpenRun, progress=None, stop_after: int | None = None) -> tuple[torch.nn.Module, float | None, int]:
    """Attention transfer where the new attention has parameters, starting from the plan's stage-1 weights
    where it has them (the planner's trained candidates); the result is kept in stage1.safetensors, so a
    resumed run skips a finished stage 1. Returns (student, final loss or None, steps run here); with a sharded
    teacher the student is its trained processors only (`stage1_trainees`), the rest being the teacher's."""
    recipe, acc = run.recipe, run.accelerator
    student = stage1_trainees(run.teacher, run.plan) if run.sharded else build_student(run.teacher, run.plan, recipe, 1)
    done = run.out / "stage1.safetensors"
    acc.wait_for_everyone()
    if done.exists():
        _load_into(student, done)
        return student, None, 0
    if run.plan.stage1:
        _copy_into(student, run.plan.stage1)
    dtype = next(run.teacher.parameters()).dtype
    step, processors = stage1_step_fn(run.teacher, student, run.sampler(1), acc.device, dtype)
    final_loss, ran = None, 0
    if processors and recipe.stage1.steps:
        params = trainable(student)
        # A parameter's variant is its layer's in the plan: "blocks.3.attn1.processor.gate_compress.weight".
        lr_scales = {name: recipe.stage1.lr_scale(run.plan.layers[name.split(".processor.")[0]].variant)
                     for name in params}
        last, ran = run_stage(
            "stage1", params, step, recipe.stage1, run.out / "checkpoints" / "stage1", run.metrics_path,
            recipe.train.checkpoint_every,
            # Stage-1 losses backpropagate inside the teacher's forward, outside any DDP wrapper.
            accelerator=acc, progress=progress, stop_after=stop_after, sync_grads=True, lr_scales=lr_scales,
        )
        final_loss = last.get("loss")
    if acc.is_main_process:
        atomic_save_safetensors(trainable(student), done)
    acc.wait_for_everyone()
    return student, final_loss, ran


def train_stage2(run: OpenRun, stage1_student, progress=None, stop_after: int | None = None):
    """The student end to end (LoRA or full), starting from stage 1's attention. Returns (student, final loss)."""
    recipe, acc = run.recipe, run.accelerator
    stage1_state = {k: v.detach().clone() for k, v in trainable(stage1_student).items()}
    # A sharded teacher cannot be copied whole: the student starts from the same weights, loaded again.
    base = load_model(run.spec, dtype=_sharded_dtype(recipe, acc)) if run.sharded else run.teacher
    student = build_student(base, run.plan, recipe, stage=2)
    if run.sharded:  # fp32 master weights (as `shard` keeps them) before stage 1's are copied in, not after
        for param in trainable(student).values():
            param.data = param.data.float()
    with torch.no_grad():
        for name, tensor in stage1_state.items():
            student.get_parameter(name).copy_(tensor)
    student.train()
    if run.sharded:
        student = shard(student, acc, reshard_after_forward=recipe.parallel.sharding == "full",
                        bf16=_bf16(recipe, acc))
    else:
        student = acc.prepare(student)
    dtype = next(run.teacher.parameters()).dtype
    step = stage2_step_fn(run.teacher, student, run.sampler(2), recipe, acc.device, dtype, run.plan, acc)
    last, _ = run_stage(
        "stage2", trainable(student), step, recipe.stage2, run.out / "checkpoints" / "stage2", run.metrics_path,
        recipe.train.checkpoint_every, accelerator=acc, progress=progress, stop_after=stop_after,
    )
    return acc.unwrap_model(student), last.get("loss")


def finish_run(run: OpenRun, student) -> None:
    """Write the student, drop the checkpoints and mark the run finished."""
    state = student.state_dict()
    if run.sharded:  # gathered onto the main process: every process takes part
        trained_in_stage1 = not run.recipe.stage2.steps  # the processors only; the rest is the teacher's
        state = {**full_state_dict(run.teacher), **state} if trained_in_stage1 else full_state_dict(student)
    if not run.accelerator.is_main_process:
        return
    recipe = run.recipe
    uses_lora = recipe.stage2.steps > 0 and recipe.stage2.mode == "lora"
    atomic_save_safetensors(state, run.out / "student.safetensors")
    shutil.rmtree(run.out / "checkpoints", ignore_errors=True)
    atomic_write_json(run.out / "run.json", {"model": run.spec, "recipe": recipe.name, "finished": True,
                                             "stage2_mode": recipe.stage2.mode,
                                             "lora": _lora_settings(recipe) if uses_lora else None})


def distill(
    spec: str,
    recipe: Recipe,
    out: str | Path,
    *,
    plan: Plan | None = None,
    resume: bool = False,
    force: bool = False,
    progress=None,
    stop_after: int | None = None,
) -> DistillSummary:
    """Run a recipe on model `spec`; write the run folder `out` and return a summary.

    out/: recipe.json, plan.json, run.json, metrics.jsonl, checkpoints/stage{1,2}/step-N/ (while running),
    stage1.safetensors, student.safetensors. With resume=True, continue the run in `out` from its newest
    checkpoint with the run's own recipe and plan (the `recipe` argument is ignored), data order and
    optimiser state. force: replace an earlier run in `out`. While it runs, the folder is locked: a
    second run into it is refused. stop_after: stop after that many steps, as a crash would.
    """
    out = Path(out)
    check_run_folder(out, resume, force)  # once before the lock creates the folder, again under it
    with folder_lock(out):
        run = open_run(spec, recipe, out, plan, resume, force, progress)
        student, _, ran = train_stage1(run, progress, stop_after)
        if run.recipe.stage2.steps:
            stop_after = None if stop_after is None else stop_after - ran
            student, _ = train_stage2(run, student, progress, stop_after)
        student.eval()
        finish_run(run, student)
    return distill_summary(out)


def distill_summary(out: str | Path) -> DistillSummary:
    """The summary of the run in `out`, from its plan and metrics (for a finished run, or one under way)."""
    out = Path(out)
    metrics_path = out / "metrics.jsonl"
    entries = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    final = {entry["stage"]: entry["loss"] for entry in entries}
    losses, uniform = _stage1_curve(entries)
    return DistillSummary(str(out), Plan.load(out / "plan.json").to_dict().get("flops_ratio"),
                          final.get("stage1"), final.get("stage2"), losses, uniform)


def _lora_settings(recipe: Recipe) -> dict:
    s2 = recipe.stage2
    return {"r": s2.lora_rank, "lora_alpha": s2.lora_alpha, "target_modules": s2.lora_targets}


def _load_into(model, path: Path) -> None:
    from safetensors.torch import load_file

    _copy_into(model, load_file(path))


def _copy_into(model, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, tensor in tensors.items():
            model.get_parameter(name).copy_(tensor)


def _stage1_curve(entries: list[dict]) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    """Per layer, for the summary: the stage-1 loss at the start and at the end, each the mean over a tenth
    of the steps (at least one), since single steps differ by their noise levels; and uniform attention's
    loss over all the steps. entries: the run's metrics lines."""
    curves: dict[str, list[float]] = {}
    uniform: dict[str, list[float]] = {}
    for entry in entries:
        if entry["stage"] == "stage1":
            for fqn, value in entry["layers"].items():
                curves.setdefault(fqn, []).append(value)
            for fqn, value in entry.get("uniform_attention", {}).items():  # absent from runs before it was logged
                uniform.setdefault(fqn, []).append(value)
    ends = {}
    for fqn, values in curves.items():
        first, last = loss_ends(values)
        if math.isfinite(last):
            ends[fqn] = (first, last)
    return ends, {fqn: sum(uniform[fqn]) / len(uniform[fqn]) for fqn in ends if fqn in uniform}
