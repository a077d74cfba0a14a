"""VSA's tile stages (surgery/kernels/vsa_tiles.py) against the same math in PyTorch.

CPU: Triton's interpreter (TRITON_INTERPRET=1, tests/conftest.py), fp32, partial tiles, two heads,
batch 2, fresh random inputs; outputs and gradients within 1e-5 relative error of fp64.
GPU (marked): bf16 at the Wan-1.3B grid, every output poisoned first; within 1e-2 of fp64 on the same
bf16 values (one bf16 rounding of each result).
"""

import math

import pytest
import torch

from surgery.grid import VideoGrid, block_layout
from surgery.kernels.tile_order import tile_permutation
from surgery.kernels.vsa_tiles import gated_coarse_to_raster, to_tiles_with_means
from surgery.variants.block_select import mean_pool_blocks


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _check(grid, tile, dtype, device, batch=2, heads=2, head_dim=16, tolerance=1e-5):
    layout = block_layout(grid, tile, device)
    order, _ = tile_permutation(grid, layout.block, device)
    args = (order, layout.offsets, math.prod(layout.block))
    make = lambda tokens: torch.randn(batch, tokens, heads, head_dim, device=device).to(dtype).requires_grad_()

    # Raster → tile order with tile means: against a gather and mean_pool_blocks, in fp64.
    x = make(grid.tokens)
    tiled, means = to_tiles_with_means(x, *args)
    assert torch.equal(tiled, x.detach()[:, order]) and means.dtype == torch.float32
    x64 = x.detach().double().requires_grad_()
    assert relative_error(means, mean_pool_blocks(x64, layout)) <= tolerance
    up_tiled, up_means = torch.randn_like(tiled), torch.randn_like(means)
    (grad,) = torch.autograd.grad((tiled, means), x, (up_tiled, up_means))
    (expected,) = torch.autograd.grad((x64[:, order], mean_pool_blocks(x64, layout)), x64,
                                      (up_tiled.double(), up_means.double()))
    assert relative_error(grad, expected) <= tolerance

    # fine (tile order) + gate ⊙ coarse of the token's tile, back in raster order.
    fine, gate = make(grid.tokens), make(grid.tokens)
    coarse = torch.randn(batch, layout.num_blocks, heads, head_dim, device=device, requires_grad=True)
    out = gated_coarse_to_raster(fine, gate, coarse, *args)
    inverse = torch.argsort(order)
    reference = lambda f, g, c: f[:, inverse] + g * c[:, layout.block_of_token]
    inputs64 = [t.detach().double().requires_grad_() for t in (fine, gate, coarse)]
    out64 = reference(*inputs64)
    assert out.dtype == dtype and relative_error(out, out64) <= tolerance
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (fine, gate, coarse), upstream)
    expected = torch.autograd.grad(out64, inputs64, upstream.double())
    for name, a, b in zip(("fine", "gate", "coarse"), grads, expected):
        assert relative_error(a, b) <= tolerance, name


@pytest.mark.parametrize("grid,tile", [((5, 6, 7), (4, 4, 4)), ((3, 5, 6), (2, 2, 2))], ids=["4x4x4", "2x2x2"])
def test_tile_stages_match_pytorch(grid, tile):
    torch.manual_seed(0)
    _check(VideoGrid(*grid), tile, torch.float32, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tile_stages_on_gpu(poisoned_empty):
    torch.manual_seed(0)
    _check(VideoGrid(21, 30, 52), (4, 4, 4), torch.bfloat16, "cuda", batch=1, heads=12, head_dim=128, tolerance=1e-2)
