"""`vsurgery export`: a finished distill run's student written as a diffusers folder (see
surgery/retrofitted.py for the format and why it never loads back silently dense)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import SurgeryError
from .io import atomic_dir, check_output_folder
from .loading import load_model
from .manifest import has_manifest, write_manifest
from .plan import Plan
from .planned import load_planned
from .retrofitted import EXPORT_VARIANT, MAX_SHARD_SIZE, SurgeryWanTransformer3DModel, inject_lora
from .swap import apply


def _merge_lora(model) -> None:
    """Fold every LoRA layer into its base weight and put the plain base layer back."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())


def rebuild_student(run: Path):
    """The trained student of a finished run folder, as an in-memory model (LoRA unmerged)."""
    run = Path(run)
    try:
        info = json.loads((run / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise SurgeryError(f"{run} is not a distill run folder (no readable run.json)") from None
    if not info.get("finished") or not (run / "student.safetensors").exists():
        raise SurgeryError(f"the run in {run} has not finished; resume it with `vsurgery distill --resume`")
    from safetensors.torch import load_file

    plan = Plan.load(run / "plan.json", stage1_weights=False)  # the student's weights hold what stage 1 made of them
    student = apply(load_model(info["model"]), plan)
    if info.get("lora"):
        inject_lora(student, info["lora"])
    try:
        student.load_state_dict(load_file(run / "student.safetensors"), strict=True)
    except Exception as e:
        raise SurgeryError(f"{run}/student.safetensors does not match the run's plan: {str(e).splitlines()[0]}") from None
    return student.eval(), plan, info


def _is_diffusers_folder(folder: Path) -> bool:
    return has_manifest(folder) or (folder / "config.json").is_file() or (folder / "model_index.json").is_file()


def export(run: str | Path, out: str | Path, merge_lora: bool = False, force: bool = False) -> Path:
    """Write the student of run folder `run` to `out` as a diffusers folder; returns `out`.

    A transformer folder (config.json + weights), or — when the run started from a pipeline folder or a tiny
    form of a Wan kind (tiny-wan2.*) — a pipeline folder whose other components are copied (built) and whose
    transformer is the student (a two-expert run: both experts, surgery.experts); either
    with a manifest of every file's size and SHA-256 (surgery/manifest.py). An existing `out` is
    replaced only with `force`, and only if it is a diffusers folder.
    """
    from .experts import export_experts, is_expert_run

    if is_expert_run(run):
        return export_experts(run, out, merge_lora=merge_lora, force=force)
    out = check_output_folder(out, force=force, replaceable=_is_diffusers_folder, what="a diffusers folder")
    student, plan, info = rebuild_student(Path(run))
    lora = info.get("lora")
    if lora and merge_lora:
        _merge_lora(student)
        lora = None
    return _write(student, plan, lora, info["model"], out, force)


def export_planned(spec: str, plan: Plan | str | Path, out: str | Path, force: bool = False) -> Path:
    """Write model `spec` with a training-free `plan` applied (no distill run) to `out`, as `export` does."""
    from .experts import ExpertPlans, export_planned_experts, load_plan_for

    plan = plan if isinstance(plan, (Plan, ExpertPlans)) else load_plan_for(spec, plan)
    if isinstance(plan, ExpertPlans):
        return export_planned_experts(spec, plan, out, force=force)
    out = check_output_folder(out, force=force, replaceable=_is_diffusers_folder, what="a diffusers folder")
    return _write(load_planned(spec, plan), plan, None, spec, out, force)


def write_transformer(student, plan: Plan, lora: dict | None, target: Path) -> None:
    """`student` as an exported transformer folder at `target` (config with its plan, weights, plan JSON)."""
    wan_config = {k: v for k, v in student.config.items() if not k.startswith("_")}
    exported = SurgeryWanTransformer3DModel(**wan_config, vsurgery_plan=plan.to_dict(), vsurgery_lora=lora)
    exported.load_state_dict(student.state_dict(), strict=True)
    exported.save_pretrained(target, variant=EXPORT_VARIANT, max_shard_size=MAX_SHARD_SIZE)
    plan.save(target / "vsurgery_plan.json")


def _write(student, plan: Plan, lora: dict | None, source_spec: str, out: Path, force: bool) -> Path:
    from .experts import write_pipeline
    from .model import split_expert
    from .pipeline import TINY_FORMS

    source = Path(split_expert(source_spec)[0])
    if (source.is_dir() and (source / "model_index.json").is_file()) or str(source) in TINY_FORMS:
        # A pipeline around the student: the source's other components (a tiny form's built in code).
        return write_pipeline({"transformer": student}, {"transformer": plan}, {"transformer": lora}, source_spec,
                              out, force)
    with atomic_dir(out, overwrite=force) as tmp:
        write_transformer(student, plan, lora, tmp)
        write_manifest(tmp)
    return out
