"""Load any model spec: a preset, a local diffusers folder (stock, or an export of ours) or a hub id.

One layer above the stock loaders (surgery/model.py) and the export format (surgery/retrofitted.py),
so neither needs the other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .model import PRESETS, build_preset, is_hub_id, load_folder, load_from_hub, read_transformer_folder, unknown_model
from .wan import SURGERY_CLASS


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


def load_model(spec: str = "tiny", *, dtype: torch.dtype | None = None, device=None, seed: int = 0):
    """Load a Wan transformer from `spec`, in eval mode.

    spec: "tiny" (built in code), a preset name (random weights, seeded; "toy" loads its trained ones),
    a local diffusers folder (a pipeline folder with transformer/, a transformer folder, or an export
    of ours, which comes back retrofitted), or a Hugging Face hub id.
    """
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
