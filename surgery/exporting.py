"""`vsurgery export`: a finished distill run's student written as a diffusers folder (see
surgery/retrofitted.py for the format and why it never loads back silently dense)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import SurgeryError
from .experts import ExpertPlans, is_expert_run, load_plan_for
from .io import atomic_dir, check_output_folder
from .loading import load_model
from .manifest import has_manifest, write_manifest
from .model import EXPERTS, expert_spec, split_expert
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


def write_pipeline(transformers: dict, plans: dict[str, Plan], loras: dict, source_spec: str, out: Path,
                   force: bool) -> Path:
    """A pipeline folder at `out` whose transformers (one, or both experts) are the exported students, with the
    other components of `source_spec` (a pipeline folder's, or a tiny form's built in code) and a manifest."""
    from .wan import SURGERY_CLASS

    source = Path(split_expert(source_spec)[0])
    with atomic_dir(out, overwrite=force) as tmp:
        if source.is_dir():
            index = json.loads((source / "model_index.json").read_text())
            for child in source.iterdir():
                if child.is_dir() and child.name not in EXPERTS:
                    shutil.copytree(child, tmp / child.name)
        else:
            from .pipeline import build_tiny_pipeline

            build_tiny_pipeline(spec=str(source)).save_pretrained(tmp)
            index = json.loads((tmp / "model_index.json").read_text())
            for name in EXPERTS:
                shutil.rmtree(tmp / name, ignore_errors=True)
        for name, student in transformers.items():
            write_transformer(student, plans[name], loras.get(name), tmp / name)
            index[name] = ["surgery", SURGERY_CLASS]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        write_manifest(tmp)
    return out


def export_experts(run: str | Path, out: str | Path, merge_lora: bool = False, force: bool = False) -> Path:
    """A finished two-expert run's students as one pipeline folder (see `write_pipeline`)."""
    out = check_output_folder(out, force=force, replaceable=_is_diffusers_folder, what="a diffusers folder")
    run = Path(run)
    info = json.loads((run / "run.json").read_text())
    if not info.get("finished"):
        raise SurgeryError(f"the run in {run} has not finished; resume it with `vsurgery distill --resume`")
    students, plans, loras = {}, {}, {}
    for name in EXPERTS:
        student, plans[name], sub_info = rebuild_student(run / name)
        loras[name] = sub_info.get("lora")
        if loras[name] and merge_lora:
            _merge_lora(student)
            loras[name] = None
        students[name] = student
    return write_pipeline(students, plans, loras, info["model"], out, force)


def export_planned_experts(spec: str, plans: ExpertPlans, out: str | Path, force: bool = False) -> Path:
    """Two-expert model `spec` with training-free `plans` applied, written as `export_experts` writes."""
    out = check_output_folder(out, force=force, replaceable=_is_diffusers_folder, what="a diffusers folder")
    plans.check_for(spec)
    students = {name: load_planned(expert_spec(spec, name), plans.plans[name]) for name in EXPERTS}
    return write_pipeline(students, plans.plans, {}, spec, out, force)
