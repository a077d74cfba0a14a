"""vsurgery: retrofit Wan2.1 video diffusion transformers with cheaper self-attention.

The public names load on first use (PEP 562), so `import surgery` — and the CLI's `--help` —
costs no torch or diffusers import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# name → the module that defines it. diffusers' pipeline loader resolves model_index.json entries
# ["surgery", "SurgeryWanTransformer3DModel"] and looks the loadable base classes (ModelMixin) up here too.
_EXPORTS = {
    "ModelMixin": "diffusers",
    "apply": ".swap", "set_backend": ".swap", "variant_processors": ".swap",
    "SurgeryError": ".errors",
    "export": ".exporting",
    "VideoGrid": ".grid", "video_grid": ".grid",
    "load_config": ".loading", "load_model": ".loading",
    "PRESETS": ".model",
    "LayerChoice": ".plan", "Plan": ".plan",
    "SurgeryWanTransformer3DModel": ".retrofitted", "load_exported": ".retrofitted",
    "VARIANTS": ".variants", "get_variant": ".variants",
}

__all__ = [
    "LayerChoice", "ModelMixin", "PRESETS", "Plan", "SurgeryError", "SurgeryWanTransformer3DModel", "VARIANTS",
    "VideoGrid", "apply", "export", "get_variant", "load_config", "load_exported", "load_model", "set_backend",
    "variant_processors", "video_grid",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'surgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from diffusers import ModelMixin

    from .swap import apply, set_backend, variant_processors
    from .errors import SurgeryError
    from .exporting import export
    from .grid import VideoGrid, video_grid
    from .loading import load_config, load_model
    from .model import PRESETS
    from .plan import LayerChoice, Plan
    from .retrofitted import SurgeryWanTransformer3DModel, load_exported
    from .variants import VARIANTS, get_variant
