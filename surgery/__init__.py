"""vsurgery: retrofit Wan2.1 video diffusion transformers with cheaper self-attention."""

from .apply import apply, set_backend, variant_processors
from .errors import SurgeryError
from .grid import VideoGrid, video_grid
from .model import PRESETS, load_config, load_model
from .plan import LayerChoice, Plan
from .variants import VARIANTS, get_variant

__all__ = [
    "PRESETS", "VARIANTS", "LayerChoice", "Plan", "SurgeryError", "VideoGrid",
    "apply", "get_variant", "load_config", "load_model", "set_backend", "variant_processors", "video_grid",
]
