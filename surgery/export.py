"""Export a distilled student as a diffusers folder that loads back retrofitted, never silently dense.

Mechanism: the exported transformer is a `SurgeryWanTransformer3DModel`, a subclass of diffusers'
`WanTransformer3DModel` whose config also records the plan (`vsurgery_plan`) and, for an unmerged
LoRA, its settings (`vsurgery_lora`). Its `__init__` builds the stock model, then applies the plan
(and injects the LoRA layers), so the new attention parameters are declared weights that
`from_pretrained` loads — and any missing or unexpected key is an error, not a warning.
For a pipeline export, model_index.json names `["surgery", "SurgeryWanTransformer3DModel"]`, so
`WanPipeline.from_pretrained(folder)` imports this library and builds the retrofitted transformer.

Weights are saved under the diffusers variant "vsurgery" (diffusion_pytorch_model.vsurgery.safetensors):
stock `WanTransformer3DModel.from_pretrained(folder)` finds no weights and fails loudly, instead of
dropping the trained attention parameters with a warning as it would for unknown keys.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

from diffusers import WanTransformer3DModel

from .apply import apply
from .errors import ModelLoadError, SurgeryError
from .io import atomic_dir
from .model import SURGERY_CLASS, check_weights, load_model
from .plan import Plan

EXPORT_VARIANT = "vsurgery"
WEIGHTS = f"diffusion_pytorch_model.{EXPORT_VARIANT}.safetensors"
WEIGHTS_INDEX = f"diffusion_pytorch_model.safetensors.index.{EXPORT_VARIANT}.json"
MAX_SHARD_SIZE = "5GB"  # diffusers' default: shards past this size


def _inject_lora(model, lora: dict) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(**lora), model)


class SurgeryWanTransformer3DModel(WanTransformer3DModel):
    """A Wan transformer with a surgery plan applied at construction (see the module docstring)."""

    def __init__(self, *args, vsurgery_plan: dict | None = None, vsurgery_lora: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_to_config(vsurgery_plan=vsurgery_plan, vsurgery_lora=vsurgery_lora)
        if vsurgery_plan is not None:
            apply(self, Plan.from_dict(vsurgery_plan))
        if vsurgery_lora is not None:
            _inject_lora(self, vsurgery_lora)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader with the export's weight variant, and strict keys."""
        if kwargs.get("variant") is None:  # pipelines pass variant=None explicitly
            kwargs["variant"] = EXPORT_VARIANT
        kwargs.pop("output_loading_info", None)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        problems = [(k, info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
        if problems:
            kind, keys = problems[0]
            raise ModelLoadError(f"{pretrained_model_name_or_path}: {kind.replace('_', ' ')} in the weights, e.g. {keys[0]}")
        return model


# diffusers reads the init signature to know which config keys to pass: Wan's plus ours.
_wan_signature = inspect.signature(WanTransformer3DModel.__init__)
SurgeryWanTransformer3DModel.__init__.__signature__ = _wan_signature.replace(
    parameters=[
        *_wan_signature.parameters.values(),
        inspect.Parameter("vsurgery_plan", inspect.Parameter.KEYWORD_ONLY, default=None),
        inspect.Parameter("vsurgery_lora", inspect.Parameter.KEYWORD_ONLY, default=None),
    ]
)


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

    plan = Plan.load(run / "plan.json")
    student = apply(load_model(info["model"]), plan)
    if info.get("lora"):
        _inject_lora(student, info["lora"])
    try:
        student.load_state_dict(load_file(run / "student.safetensors"), strict=True)
    except Exception as e:
        raise SurgeryError(f"{run}/student.safetensors does not match the run's plan: {str(e).splitlines()[0]}") from None
    return student.eval(), plan, info


def export(run: str | Path, out: str | Path, merge_lora: bool = False, overwrite: bool = False) -> Path:
    """Write the student of run folder `run` to `out` as a diffusers folder; returns `out`.

    A transformer folder (config.json + weights), or — when the run started from a pipeline folder —
    a pipeline folder whose other components are copied and whose transformer is the student.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise SurgeryError(f"{out} already exists; choose another --out")
    student, plan, info = rebuild_student(Path(run))
    lora = info.get("lora")
    if lora and merge_lora:
        _merge_lora(student)
        lora = None
    wan_config = {k: v for k, v in student.config.items() if not k.startswith("_")}
    exported = SurgeryWanTransformer3DModel(**wan_config, vsurgery_plan=plan.to_dict(), vsurgery_lora=lora)
    exported.load_state_dict(student.state_dict(), strict=True)
    source = Path(info["model"])
    pipeline = source.is_dir() and (source / "model_index.json").is_file()
    with atomic_dir(out, overwrite=overwrite) as tmp:
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
    return out


def load_exported(path: str | Path, dtype=None, device=None):
    """Load an export (transformer or pipeline folder) as the retrofitted transformer."""
    folder = Path(path)
    if (folder / "model_index.json").is_file():
        folder = folder / "transformer"
    check_weights(folder, WEIGHTS, WEIGHTS_INDEX)
    try:
        model = SurgeryWanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype)
    except SurgeryError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot load the export in {folder}: {str(e).splitlines()[0]}") from None
    return model.to(device) if device is not None else model


__all__ = ["SurgeryWanTransformer3DModel", "export", "load_exported", "rebuild_student"]
