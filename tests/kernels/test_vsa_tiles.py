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
from surgery.kernels.vsa_tiles import gated_coarse_to_raster, to_tiles_with_means, top_tiles
from surgery.variants.block_select import mean_pool_blocks
from surgery.variants.vsa import select_key_tiles


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


@pytest.mark.parametrize("shape,top_k,rounded", [((2, 3, 37, 37), 5, False), ((1, 2, 20, 20), 20, False),
                                                 ((2, 2, 50, 50), 7, True), ((1, 1, 3, 600), 100, True),
                                                 ((1, 1, 5, 9), 1, True)])
def test_top_tiles_selects_what_the_stable_sort_selects(shape, top_k, rounded):
    """The same tiles as the reference's stable descending sort, in id order: ties (scores rounded to a few
    values) go to the lower tile id, -0.0 ties +0.0, k = n keeps all, rows not a multiple of a program's."""
    g = torch.Generator().manual_seed(hash((shape, top_k)) % 2**31)
    scores = torch.randn(shape, generator=g)
    if rounded:
        scores = scores.round()
    scores[..., 0, :2] = -0.0
    tiles = top_tiles(scores, top_k)
    assert tiles.dtype == torch.int32 and tiles.shape == (*shape[:-1], top_k)
    assert torch.equal(tiles.long(), select_key_tiles(scores, top_k).sort(-1).values)


def test_top_tiles_rejects_bad_input():
    with pytest.raises(ValueError, match="top_k"):
        top_tiles(torch.randn(1, 1, 4, 4), 5)
    with pytest.raises(ValueError, match="fp32"):
        top_tiles(torch.randn(1, 1, 4, 4, dtype=torch.float64), 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tiles,top_k", [(624, 78), (624, 156), (1440, 180)])
def test_top_tiles_on_gpu(tiles, top_k):
    """Wan-1.3B's and 720p's tile counts, 12 heads, at VSA's sparsities; scores with and without ties."""
    g = torch.Generator(device="cuda").manual_seed(tiles + top_k)
    scores = torch.randn(1, 12, tiles, tiles, device="cuda", generator=g)
    for s in (scores, (scores * 4).round()):
        assert torch.equal(top_tiles(s, top_k).long(), select_key_tiles(s, top_k).sort(-1).values)
