"""Token permutations between Wan's raster order and block-major (tile) order, on the device.

`block_layout(grid, tile)` already caches the forward index `order` per (grid, tile, device); this adds
its cached inverse and a gather whose backward is the inverse gather (not a scatter-add), so going
to tile order and back costs one `index_select` each way, forward and backward.
"""

from __future__ import annotations

import functools

import torch

from ..grid import VideoGrid, block_layout


@functools.lru_cache(maxsize=64)
def tile_permutation(grid: VideoGrid, tile: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse) [S] int64 on `device`: tile-order position p holds raster token order[p], and
    raster token n sits at tile-order position inverse[n]."""
    order = block_layout(grid, tile, device).order
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return order, inverse


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(1, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def to_tile_order(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """[B, S, ...] in raster order → the same tokens in tile order (a new contiguous tensor)."""
    return _Gather.apply(x, order, inverse)


def to_raster_order(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_tile_order`: [B, S, ...] in tile order → raster order."""
    return _Gather.apply(x, inverse, order)
