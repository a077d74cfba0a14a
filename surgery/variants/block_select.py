"""Math shared by the block-sparse variants (`vsa`, `vmoba`): block means, and exact softmax
attention restricted to selected key blocks.

A selection is a boolean block mask `[B, H, S, n]`: query token (raster order) × key block of a
`BlockLayout`. The references expand it to a token mask over the full `[S, S]` score matrix, which
is what a block-sparse kernel must reproduce without ever forming it.
"""

from __future__ import annotations

import math

import torch

from ..grid import BlockLayout, VideoGrid
from .base import softmax_scale


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision inputs; fp32 and fp64 stay as they are."""
    return torch.promote_types(dtype, torch.float32)


def block_count(grid: VideoGrid, block: tuple[int, int, int]) -> int:
    """Number of blocks (edge blocks partial) in `grid`, without torch: for cost models."""
    return math.prod(math.ceil(g / b) for g, b in zip(grid.shape, block))


def mean_pool_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Mean of each block's tokens, dividing by its real token count.

    x: [B, S, H, D] in raster order. Returns [B, n, H, D], n = layout.num_blocks.
    """
    if layout.equal_blocks:  # a gather and a plain mean: `index_add` into a few rows is atomics-bound on GPUs
        return x.index_select(1, layout.order).unflatten(1, (layout.num_blocks, -1)).mean(2)
    sums = x.new_zeros(x.shape[0], layout.num_blocks, *x.shape[2:]).index_add(1, layout.block_of_token, x)
    return sums / layout.sizes.view(1, -1, 1, 1).to(x.dtype)


def attend_selected_blocks(q, k, v, layout: BlockLayout, block_mask: torch.Tensor) -> torch.Tensor:
    """Exact softmax attention (scale 1/√D) of each query over the keys of its selected blocks only.

    q, k, v: [B, S, H, D] in raster order; block_mask: [B, H, S, n] bool, True where query token s
    attends key block j of `layout` (every row needs at least one True). Computes in the dtype of
    q, k, v. Returns [B, S, H, D].
    """
    token_mask = block_mask[..., layout.block_of_token]  # [B, H, S, S]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale(q.shape[-1])
    probs = scores.masked_fill(~token_mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)
