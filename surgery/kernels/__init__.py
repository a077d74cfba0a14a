"""Triton kernels, each with its autograd Function and a plain-PyTorch `*_reference` beside it.

Without CUDA, Triton runs kernels only in its interpreter: TRITON_INTERPRET=1 must be set before
`triton` is first imported (diffusers imports it), which the test suite's root conftest does.
"""

from .block_sparse import block_sparse_attention, block_sparse_attention_reference
from .tile_order import tile_permutation, to_raster_order, to_tile_order

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "tile_permutation",
    "to_raster_order",
    "to_tile_order",
]
