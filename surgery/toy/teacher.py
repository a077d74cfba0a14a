"""The shipped toy teacher, loaded: its transformer and its caption encoder."""

from __future__ import annotations

import torch

from ..loading import load_model
from .captions import load_caption_encoder


def load_toy(device=None, dtype: torch.dtype | None = None):
    """The shipped toy teacher: (a stock `WanTransformer3DModel`, its `CaptionEncoder`)."""
    transformer = load_model("toy", dtype=dtype, device=device)
    return transformer, load_caption_encoder(device)
