"""Tap a model's self-attention: see each layer's q, k, v, input and full-attention output.

The planner measures candidates and stage-1 distillation trains them on these taps, one layer at
a time inside a single teacher forward, so no more than one layer's activations live at once.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from .swap import forward_context, self_attention_modules
from .grid import VideoGrid
from .variants.full import FullAttention, FullConfig
from .wan import layer_index

# callback(layer_index, q, k, v, x, y, grid): q, k, v, y [B, S, H, D]; x [B, S, dim]
TapFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, VideoGrid], None]


class _TapAttention(FullAttention):
    """Full attention that also hands its inputs and output to a callback."""

    def __init__(self, callback: TapFn, **kwargs):
        super().__init__(FullConfig(), **kwargs)
        self.callback = callback

    def attend_reference(self, q, k, v, grid, x=None):
        y = super().attend_reference(q, k, v, grid, x)
        self.callback(self.layer_index, q, k, v, x, y, grid)
        return y


@contextlib.contextmanager
def tap_self_attention(model, callback: TapFn, layers: set[int] | None = None) -> Iterator[None]:
    """Within the block, every (or each listed) self-attention layer of `model` runs dense attention
    and calls `callback`; the original processors come back afterwards."""
    ctx = forward_context(model)
    saved = {}
    try:
        for fqn, attn in self_attention_modules(model).items():
            index = layer_index(fqn)
            if layers is not None and index not in layers:
                continue
            saved[fqn] = attn.processor
            tap = _TapAttention(
                callback, heads=attn.heads, head_dim=attn.inner_dim // attn.heads,
                dim=attn.to_q.in_features, layer_index=index,
            )
            tap.forward_context = ctx
            attn.processor = tap
        yield
    finally:
        modules = self_attention_modules(model)
        for fqn, processor in saved.items():
            modules[fqn].set_processor(processor)
