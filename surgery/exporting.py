"""`vsurgery export`: a finished distill run's student written as a diffusers folder (see
surgery/retrofitted.py for the format and why it never loads back silently dense)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import SurgeryError
from .io import atomic_dir, check_output_folder
from .loading import load_model
from .manifest import has_manifest, write_manifest
from .plan import Plan
from .planned import load_planned
from .retrofitted import EXPORT_VARIANT, MAX_SHARD_SIZE, SurgeryWanTransformer3DModel, inject_lora
from .swap import apply
from .wan import SURGERY_CLASS


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

    A transformer folder (config.json + weights), or — when the run started from a pipeline folder —
    a pipeline folder whose other components are copied and whose transformer is the student; either
    with a manifest of every file's size and SHA-256 (surgery/manifest.py). An existing `out` is
    replaced only with `force`, and only if it is a diffusers folder.
    """
    out = check_output_folder(out, force=force, replaceable=_is_diffusers_folder, what="a diffusers folder")
    student, plan, info = rebuild_student(Path(run))
    lora = info.get("lora")
    if lora and merge_lora:
        _merge_lora(student)
        lora = None
    return _write(student, plan, lora, info["model"], out, force)


def export_planned(spec: str, plan: Plan | str | Path, out: str | Path, force: bool = False) -> Path:
    """Write model `spec` with a training-free `plan` applied (no distill run) to `out`, as `export` does."""
    out = check_output_folder(out, force=force, replaceable=_is_diffusers_folder, what="a diffusers folder")
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    return _write(load_planned(spec, plan), plan, None, spec, out, force)


def _write(student, plan: Plan, lora: dict | None, source_spec: str, out: Path, force: bool) -> Path:
    wan_config = {k: v for k, v in student.config.items() if not k.startswith("_")}
    exported = SurgeryWanTransformer3DModel(**wan_config, vsurgery_plan=plan.to_dict(), vsurgery_lora=lora)
    exported.load_state_dict(student.state_dict(), strict=True)
    source = Path(source_spec)
    pipeline = source.is_dir() and (source / "model_index.json").is_file()
    with atomic_dir(out, overwrite=force) as tmp:
        target = tmp / "transformer" if pipeline else tmp
        exported.save_pretrained(target, variant=EXPORT_VARIANT, max_shard_size=MAX_SHARD_SIZE)
        plan.save(target / "vsurgery_plan.json")
        if pipeline:
            index = json.loads((source / "model_index.json").read_text())
            index["transformer"] = ["surgery", SURGERY_CLASS]
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
            for child in source.iterdir():
                if child.is_dir() and child.name != "transformer":
                    shutil.copytree(child, tmp / child.name)
        write_manifest(tmp)
    return out
