"""Load any model spec: a preset, a local diffusers folder (stock, or an export of ours) or a hub id.

One layer above the stock loaders (surgery/model.py) and the export format (surgery/retrofitted.py),
so neither needs the other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .model import PRESETS, build_preset, is_hub_id, load_folder, load_from_hub, read_transformer_folder, unknown_model
from .errors import ModelLoadError, SurgeryError
from .wan import SURGERY_CLASS


def is_export(spec: str) -> bool:
    """Whether `spec` is a folder holding an export of ours (transformer or pipeline)."""
    if spec in PRESETS or not Path(spec).is_dir():
        return False
    try:
        _, config = read_transformer_folder(Path(spec))
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
    """The transformer config of a model spec, without loading weights."""
    if spec in PRESETS:
        return dict(PRESETS[spec].config)
    path = Path(spec)
    if path.is_dir():
        _, config = read_transformer_folder(path)
        return {k: v for k, v in config.items() if not k.startswith("_")}
    if is_hub_id(spec):
        return {k: v for k, v in load_model(spec).config.items() if not k.startswith("_")}
    raise unknown_model(spec)


def load_model(spec: str = "tiny", *, dtype: torch.dtype | None = None, device=None, seed: int = 0,
               verify: bool = False):
    """Load a Wan transformer from `spec`, in eval mode.

    spec: "tiny" (built in code), a preset name (random weights, seeded; "toy" loads its trained ones),
    a local diffusers folder (a pipeline folder with transformer/, a transformer folder, or an export
    of ours, which comes back retrofitted), or a Hugging Face hub id.
    verify: `spec` is an export; check its files against its manifest's SHA-256 before loading.
    """
    if verify:
        verify_model(spec)
    if spec in PRESETS and PRESETS[spec].weights is not None:
        spec = str(PRESETS[spec].weights)  # a trained preset loads as its transformer folder
    if spec in PRESETS:
        model = build_preset(spec, dtype=dtype, device=device, seed=seed)
    elif Path(spec).is_dir():
        folder, config = read_transformer_folder(Path(spec))
        if config["_class_name"] == SURGERY_CLASS:
            from .retrofitted import load_exported

            model = load_exported(folder, dtype=dtype, device=device)
        else:
            model = load_folder(folder, dtype=dtype, device=device)
    elif is_hub_id(spec):
        model = load_from_hub(spec, dtype=dtype, device=device)
    else:
        raise unknown_model(spec)
    return model.eval()
