"""Load any model spec: a preset, a local diffusers folder (stock, or an export of ours) or a hub id.

One layer above the stock loaders (surgery/model.py) and the export format (surgery/retrofitted.py),
so neither needs the other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .model import (
    EXPERTS, PRESETS, build_preset, is_hub_id, load_folder, load_from_hub, model_kind, read_transformer_folder,
    split_expert, unknown_model,
)
from .errors import ModelLoadError, SurgeryError
from .wan import SURGERY_CLASS


def is_export(spec: str) -> bool:
    """Whether `spec` is a folder holding an export of ours (transformer or pipeline)."""
    spec, expert = split_expert(spec)
    if spec in PRESETS or not Path(spec).is_dir():
        return False
    try:
        _, config = read_transformer_folder(Path(spec), expert or EXPERTS[0])
    except ModelLoadError:
        return False
    return config["_class_name"] == SURGERY_CLASS


def verify_model(spec: str) -> int:
    """Check every file of the export `spec` against its manifest's SHA-256; returns how many were checked."""
    from .retrofitted import verify_export

    if not is_export(spec):
        raise SurgeryError(f"{spec} is not an export folder: only exports have a manifest to verify")
    return verify_export(spec)


def load_config(spec: str) -> dict:
    """The transformer config of a model spec (of its first expert, where it has two), without loading weights."""
    base, expert = split_expert(spec)
    if base in PRESETS:
        return dict(PRESETS[base].config)
    path = Path(base)
    if path.is_dir():
        _, config = read_transformer_folder(path, expert or EXPERTS[0])
        return {k: v for k, v in config.items() if not k.startswith("_")}
    if is_hub_id(base):
        return {k: v for k, v in load_model(spec).config.items() if not k.startswith("_")}
    raise unknown_model(spec)


def _check_expert(spec: str, expert: str | None) -> None:
    """One transformer of `spec` is what is asked for: a two-expert model needs the expert named, and only a
    two-expert model has one to name."""
    kind = model_kind(spec) if spec in PRESETS else None
    if kind is None:
        return  # folders check their own layout (surgery.model.read_transformer_folder)
    if kind.two_experts and expert is None:
        raise ModelLoadError(f"{spec} has two experts (transformer, transformer_2): the commands run both; "
                             f"to load one, name it ({spec}@transformer)")
    if not kind.two_experts and expert not in (None, EXPERTS[0]):
        raise ModelLoadError(f"{spec} has one transformer: it has no {expert}")


def load_model(spec: str = "tiny", *, dtype: torch.dtype | None = None, device=None, seed: int = 0,
               verify: bool = False):
    """Load a Wan transformer from `spec`, in eval mode.

    spec: "tiny" (built in code), a preset name (random weights, seeded; "toy" loads its trained ones),
    a local diffusers folder (a pipeline folder with transformer/, a transformer folder, or an export
    of ours, which comes back retrofitted), or a Hugging Face hub id; of a two-expert model (Wan2.2 A14B),
    one expert named after "@" ("tiny-wan2.2@transformer_2").
    verify: `spec` is an export; check its files against its manifest's SHA-256 before loading.
    """
    if verify:
        verify_model(spec)
    spec, expert = split_expert(spec)
    _check_expert(spec, expert)
    if spec in PRESETS and PRESETS[spec].weights is not None:
        spec = str(PRESETS[spec].weights)  # a trained preset loads as its transformer folder
    if spec in PRESETS:
        model = build_preset(spec, dtype=dtype, device=device, seed=seed, expert=expert)
    elif Path(spec).is_dir():
        folder, config = read_transformer_folder(Path(spec), expert)
        if config["_class_name"] == SURGERY_CLASS:
            from .retrofitted import load_exported

            model = load_exported(folder, dtype=dtype, device=device)
        else:
            model = load_folder(folder, dtype=dtype, device=device)
    elif is_hub_id(spec):
        model = load_from_hub(spec, dtype=dtype, device=device, subfolder=expert or EXPERTS[0])
    else:
        raise unknown_model(spec)
    return model.eval()
