"""`full`: Wan's dense softmax attention, through diffusers' dispatcher. The budget's yardstick."""

from __future__ import annotations

import dataclasses

from diffusers.models.attention_dispatch import dispatch_attention_fn

from ..grid import VideoGrid
from .base import AttentionVariant, VariantConfig, dense_attention_flops


@dataclasses.dataclass(frozen=True)
class FullConfig(VariantConfig):
    """Dense attention has no settings."""


class FullAttention(AttentionVariant):
    name = "full"
    Config = FullConfig

    @classmethod
    def flops(cls, config: FullConfig, grid: VideoGrid, heads: int, head_dim: int) -> float:
        return dense_attention_flops(grid.tokens, heads, head_dim)

    @classmethod
    def density(cls, config: FullConfig, grid: VideoGrid) -> float:
        return 1.0

    def attend_reference(self, q, k, v, grid, x=None):
        # Whatever backend diffusers would pick (cuDNN / flash on GPU) is full attention's kernel.
        return dispatch_attention_fn(q, k, v, backend=self._attention_backend)
