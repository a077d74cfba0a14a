"""Tile-mixed linear terms (Triton: per-tile summaries, one matmul mixing them per query tile, φ inside the kernels)
against a naive reference that builds every query × key weight explicitly: N and E, and the gradients of q, k, v and
both feature maps' W and b.

On CPU the kernels run in Triton's interpreter at tiny shapes with 16-token summary steps and 16-column value
slices (tiles longer than a step, partial edge tiles, batch 2, several heads); fp32 against the reference in fp64,
relative error ≤ 1e-3, on fresh random tile weights (not only 0/1). The GPU test (`-m gpu`) runs Wan's head size in
bf16 against the reference in fp32 on the same bf16 values, relative error ≤ 2e-2, and checks repeatability.
"""

import pytest
import torch
from torch.func import functional_call

from surgery.grid import VideoGrid, block_layout
from surgery.kernels import tile_linear
from surgery.kernels.tile_linear import tile_mixed_linear_terms
from surgery.variants.feature_maps import FeatureMap

from .conftest import deterministic_algorithms
from .test_block_sparse import DEVICE, gpu, needs_cuda, rel_err

GRAD_NAMES = ["q", "k", "v", "weight_q", "bias_q", "weight_k", "bias_k"]


@pytest.fixture
def small_blocks(monkeypatch):
    """16-token summary steps and 16-column slices: tiles of more than 16 tokens take several steps."""
    monkeypatch.setitem(tile_linear.CONFIGS, "summary", {**tile_linear.CONFIGS["summary"], "BLOCK_S": 16,
                                                         "BLOCK_D": 16})


def naive_terms(q, k, v, maps, params, tile_weights, offsets):
    """N = (φ_q φ_kᵀ ∘ W) v and E = (φ_q φ_kᵀ ∘ W) 1 with W [B, H, S, S] the token × token expansion of the tile
    weights: the definition, with no summaries. φ is `FeatureMap`'s own forward with the parameters given."""
    tile_of = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff().cpu()).to(q.device)
    weights = tile_weights[:, :, tile_of][:, :, :, tile_of]  # [B, H, S, S]
    phi_q, phi_k = (functional_call(m, {"weight": w, "bias": b}, (x,))
                    for m, (w, b), x in zip(maps, (params[:2], params[2:]), (q, k)))
    pair = torch.einsum("bshf,bthf->bhst", phi_q, phi_k) * weights
    return torch.einsum("bhst,bthd->bshd", pair, v), pair.sum(-1)


def random_maps(heads, head_dim, features, generator):
    maps = []
    for _ in range(2):
        m = FeatureMap(heads, head_dim, features, 0)
        with torch.no_grad():
            m.weight.add_(0.3 * torch.randn(m.weight.shape, generator=generator))
            m.bias.add_(0.3 * torch.randn(m.bias.shape, generator=generator))
        maps.append(m.to(DEVICE))
    return maps


def check(q, k, v, maps, tile_weights, offsets, max_tile, tol):
    params = [p for m in maps for p in (m.weight, m.bias)]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, *params)]
    num, den = tile_mixed_linear_terms(*leaves, tile_weights, offsets, max_tile)
    ref_dtype = torch.float64 if q.dtype == torch.float32 else torch.float32
    ref_leaves = [t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v, *params)]
    ref_num, ref_den = naive_terms(*ref_leaves[:3], maps, ref_leaves[3:], tile_weights.to(ref_dtype), offsets)
    up_num, up_den = torch.randn_like(num), torch.rand_like(den)
    grads = torch.autograd.grad((num, den), leaves, (up_num, up_den))
    ref_grads = torch.autograd.grad((ref_num, ref_den), ref_leaves, (up_num.to(ref_dtype), up_den.to(ref_dtype)))
    errors = {"num": rel_err(num, ref_num), "den": rel_err(den, ref_den)}
    errors.update({f"d{name}": rel_err(g, r) for name, g, r in zip(GRAD_NAMES, grads, ref_grads)})
    assert all(e <= tol for e in errors.values()), errors
    return errors


@pytest.mark.parametrize(
    "grid,tile,batch,heads,head_dim,features",
    [((3, 5, 6), (2, 2, 4), 2, 2, 16, 16), ((5, 6, 5), (4, 4, 4), 1, 3, 32, 16)],
    ids=["3x5x6-tile2x2x4-b2h2d16", "5x6x5-tile4x4x4-b1h3d32f16"],
)
def test_matches_naive_reference(grid, tile, batch, heads, head_dim, features, small_blocks):
    g = torch.Generator().manual_seed(hash((grid, tile)) % 2**31)
    layout = block_layout(VideoGrid(*grid), tile, DEVICE)
    n, S = layout.num_blocks, layout.order.numel()
    q, k, v = (torch.randn(batch, S, heads, head_dim, generator=g).to(DEVICE) for _ in range(3))
    tile_weights = torch.rand(batch, heads, n, n, generator=g).to(DEVICE)
    maps = random_maps(heads, head_dim, features, g)
    check(q, k, v, maps, tile_weights, layout.offsets, tile[0] * tile[1] * tile[2], 1e-3)


def test_zero_weights_give_zero_terms(small_blocks):
    """Every key tile selected (U = 0): no linear mass at all, and no gradient into the maps."""
    layout = block_layout(VideoGrid(2, 4, 8), (2, 2, 4), DEVICE)
    q = torch.randn(1, layout.order.numel(), 2, 16, device=DEVICE)
    maps = random_maps(2, 16, 16, torch.Generator().manual_seed(1))
    zeros = torch.zeros(1, 2, layout.num_blocks, layout.num_blocks, device=DEVICE)
    num, den = tile_mixed_linear_terms(q, q, q, *(p for m in maps for p in (m.weight, m.bias)), zeros,
                                       layout.offsets, 16)
    assert num.abs().max() == 0 and den.abs().max() == 0


def test_rejects_mismatched_shapes():
    layout = block_layout(VideoGrid(2, 4, 8), (2, 2, 4), DEVICE)
    q = torch.randn(1, layout.order.numel(), 2, 16, device=DEVICE)
    maps = random_maps(2, 16, 16, torch.Generator().manual_seed(2))
    params = [p for m in maps for p in (m.weight, m.bias)]
    wrong = torch.ones(1, 2, layout.num_blocks, layout.num_blocks - 1, device=DEVICE)
    with pytest.raises(ValueError, match="tile_weights"):
        tile_mixed_linear_terms(q, q, q, *params, wrong, layout.offsets, 16)
    with pytest.raises(ValueError, match="k and v"):
        tile_mixed_linear_terms(q, q[:, :-1], q, *params, wrong, layout.offsets, 16)


# ---- GPU -------------------------------------------------------------------------------------------
def wan_case(seed, grid=VideoGrid(5, 30, 52)):
    """Wan2.1-1.3B's frame size over 5 frames, 4×4×4 tiles, 4 heads × 128, F = 128, 1 − a random top-k selection."""
    g = torch.Generator().manual_seed(seed)
    layout = block_layout(grid, (4, 4, 4), "cuda")
    n, S, H = layout.num_blocks, layout.order.numel(), 4
    selected = torch.zeros(1, H, n, n).scatter_(-1, torch.rand(1, H, n, n, generator=g).topk(n // 8).indices, 1.0)
    q, k, v = (torch.randn(1, S, H, 128, generator=g).cuda().bfloat16() for _ in range(3))
    maps = [m.bfloat16() for m in random_maps(H, 128, 128, g)]
    return q, k, v, maps, (1 - selected).cuda(), layout.offsets


@gpu
@needs_cuda
def test_gpu_wan_head_bf16(poisoned_empty):
    q, k, v, maps, tile_weights, offsets = wan_case(5)
    print(check(q, k, v, maps, tile_weights, offsets, 64, 2e-2))


@gpu
@needs_cuda
def test_gpu_repeatable_bit_for_bit():
    """One program per tile, no atomics: outputs and gradients are identical from call to call."""
    q, k, v, maps, tile_weights, offsets = wan_case(6)
    leaves = [t.requires_grad_() for t in (q, k, v, *(p for m in maps for p in (m.weight, m.bias)))]
    with deterministic_algorithms():
        runs = []
        for _ in range(3):
            num, den = tile_mixed_linear_terms(*leaves, tile_weights, offsets, 64)
            runs.append([num, den, *torch.autograd.grad((num, den), leaves, (torch.ones_like(num),
                                                                             torch.ones_like(den)))])
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))
