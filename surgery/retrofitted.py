"""The exported model: a Wan transformer that carries its surgery plan and loads back retrofitted.

The exported transformer is a `SurgeryWanTransformer3DModel`, a subclass of diffusers'
`WanTransformer3DModel` whose config also records the plan (`vsurgery_plan`) and, for an unmerged
LoRA, its settings (`vsurgery_lora`). Its `__init__` builds the stock model, then applies the plan
(and injects the LoRA layers), so the new attention parameters are declared weights that
`from_pretrained` loads — and any missing or unexpected key is an error, not a warning.
For a pipeline export, model_index.json names `["surgery", "SurgeryWanTransformer3DModel"]`, so
`WanPipeline.from_pretrained(folder)` imports this library and builds the retrofitted transformer.

Weights are saved under the diffusers variant "vsurgery" (diffusion_pytorch_model.vsurgery.safetensors):
stock `WanTransformer3DModel.from_pretrained(folder)` finds no weights and fails loudly, instead of
dropping the trained attention parameters with a warning as it would for unknown keys.

The export's root holds a manifest (surgery/manifest.py): loading checks the sizes of the files it
reads against it; `load_exported(..., verify=True)` checks their SHA-256 too.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from diffusers import WanTransformer3DModel

from .swap import apply
from .errors import ModelLoadError, SurgeryError
from .manifest import check_manifest, has_manifest
from .model import check_weights
from .plan import Plan

EXPORT_VARIANT = "vsurgery"
WEIGHTS = f"diffusion_pytorch_model.{EXPORT_VARIANT}.safetensors"
WEIGHTS_INDEX = f"diffusion_pytorch_model.safetensors.index.{EXPORT_VARIANT}.json"
MAX_SHARD_SIZE = "5GB"  # diffusers' default: shards past this size


def inject_lora(model, lora: dict) -> None:
    """peft LoRA layers with `lora` (LoraConfig fields) on `model`, in place."""
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
            inject_lora(self, vsurgery_lora)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader with the export's weight variant, and strict keys."""
        if kwargs.get("variant") is None:  # pipelines pass variant=None explicitly
            kwargs["variant"] = EXPORT_VARIANT
        local = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
        if local.is_dir():
            check_export_files(local)
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


def export_root(folder: str | Path) -> tuple[Path, str]:
    """(the export's root folder, the transformer's folder inside it) for an export's root or its
    pipeline's transformer/ (or transformer_2/) folder."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder, "transformer"
    if folder.name in ("transformer", "transformer_2") and (folder.parent / "model_index.json").is_file():
        return folder.parent, folder.name
    return folder, ""


def check_export_files(folder: str | Path, hashes: bool = False) -> int:
    """The transformer files of the export at `folder` against the manifest: sizes, and SHA-256 with
    `hashes`. An export without a manifest (written before exports had one) is not checked."""
    root, transformer = export_root(folder)
    return check_manifest(root, under=transformer, hashes=hashes) if has_manifest(root) else 0


def verify_export(folder: str | Path) -> int:
    """Every file of the export at `folder` against its manifest's SHA-256; returns how many were checked."""
    return check_manifest(export_root(folder)[0], hashes=True)


def load_exported(path: str | Path, dtype=None, device=None, verify: bool = False):
    """Load an export (transformer or pipeline folder) as the retrofitted transformer.

    verify: first check every file of the export against its manifest's SHA-256 (`vsurgery verify`)."""
    if verify:
        verify_export(path)
    root, transformer = export_root(path)
    if Path(path) == root and (root / "transformer_2").is_dir():
        raise ModelLoadError(f"{root} holds two experts (transformer, transformer_2): load it with "
                             f"WanPipeline.from_pretrained, or load one expert's folder ({root / 'transformer'})")
    folder = root / transformer
    check_export_files(folder)
    check_weights(folder, WEIGHTS, WEIGHTS_INDEX)
    try:
        model = SurgeryWanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype)
    except SurgeryError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot load the export in {folder}: {str(e).splitlines()[0]}") from None
    return model.to(device) if device is not None else model


__all__ = ["EXPORT_VARIANT", "SurgeryWanTransformer3DModel", "inject_lora", "load_exported", "verify_export"]
