"""vsurgery: retrofit Wan2.1 video diffusion transformers with cheaper self-attention."""

# diffusers' pipeline loader resolves model_index.json entries ["surgery", "SurgeryWanTransformer3DModel"]
# and looks the loadable base classes up in this module too.
from diffusers import ModelMixin

from .apply import apply, set_backend, variant_processors
from .errors import SurgeryError
from .export import export
from .grid import VideoGrid, video_grid
from .loading import load_config, load_model
from .model import PRESETS
from .plan import LayerChoice, Plan
from .retrofitted import SurgeryWanTransformer3DModel, load_exported
from .variants import VARIANTS, get_variant

__all__ = [
    "ModelMixin", "PRESETS", "VARIANTS", "LayerChoice", "Plan", "SurgeryError", "SurgeryWanTransformer3DModel", "VideoGrid",
    "apply", "export", "load_exported", "get_variant", "load_config", "load_model", "set_backend", "variant_processors", "video_grid",
]
