"""Selected-tile hybrid op (Triton: block-sparse softmax plus a linear term under one normaliser) against its
plain-PyTorch reference: output and the gradients of q, k, v and both linear terms.

On CPU the kernel runs in Triton's interpreter at tiny shapes in fp32, relative error ≤ 1e-3 against the
reference in fp64. GPU tests (`-m gpu`) use real shapes in bf16, relative error ≤ 1e-2 against the reference in
fp32 on the same bf16 inputs.
"""

import copy
import math

import pytest
import torch

from surgery.grid import VideoGrid, block_layout
from surgery.kernels.selected_hybrid import selected_hybrid_attention, selected_hybrid_attention_reference
from surgery.variants.hybrid_selected import HybridSelectedAttention, HybridSelectedConfig

from .conftest import deterministic_algorithms
from .test_block_sparse import DEVICE, gpu, needs_cuda, random_selection, rel_err


def linear_terms(batch, tokens, heads, head_dim, generator, dtype=torch.float32):
    """N [B, S, H, D] and E [B, H, S] > 0 of the size φ_q·summary gives (E is a sum of positive features)."""
    num = torch.randn(batch, tokens, heads, head_dim, generator=generator)
    den = torch.rand(batch, heads, tokens, generator=generator) * 4 + 0.1
    return num.to(DEVICE, dtype), den.to(DEVICE)


def check_against_reference(q, k, v, num, den, args, kwargs, tol):
    leaves = [t.detach().requires_grad_() for t in (q, k, v, num, den)]
    out = selected_hybrid_attention(*leaves, *args, **kwargs)
    ref_dtype = torch.float64 if q.dtype == torch.float32 else torch.float32
    ref_leaves = [t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v, num, den)]
    ref = selected_hybrid_attention_reference(*ref_leaves, *args, **kwargs)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, upstream)
    ref_grads = torch.autograd.grad(ref, ref_leaves, upstream.to(ref_dtype))
    errors = {"out": rel_err(out, ref)}
    errors.update({f"d{name}": rel_err(g, r) for name, g, r in zip(["q", "k", "v", "num", "den"], grads, ref_grads)})
    assert all(e <= tol for e in errors.values()), errors
    return errors


def nonempty_selection(batch, heads, n_q, n_kv, max_k, generator, device=DEVICE):
    """`random_selection`'s distinct blocks in random order, with 1 … max_k used per query tile (the op needs one)."""
    index, _ = random_selection(batch, heads, n_q, n_kv, max_k, generator, device, full=True)
    count = torch.randint(1, max_k + 1, (batch, heads, n_q), generator=generator).int().to(device)
    return torch.where(torch.arange(max_k, device=device) < count[..., None], index, -7), count


@pytest.mark.parametrize(
    "grid,tile,batch,heads,head_dim",
    [((3, 5, 6), (2, 2, 4), 2, 2, 16), ((5, 6, 5), (4, 4, 4), 1, 2, 32)],
    ids=["3x5x6-tile2x2x4-b2h2d16", "5x6x5-tile4x4x4-b1h2d32"],
)
def test_tiles_partial_blocks(grid, tile, batch, heads, head_dim, poisoned_empty):
    """Query tiles = key tiles = the grid's tiles, edge tiles partial (half steps in the second case), random
    top-k lists: neighbouring listed tiles make a row's argmax key sit just past another block's end."""
    g = torch.Generator().manual_seed(hash((grid, tile)) % 2**31)
    layout = block_layout(VideoGrid(*grid), tile, DEVICE)
    n, S = layout.num_blocks, layout.order.numel()
    index, count = nonempty_selection(batch, heads, n, n, max_k=3, generator=g)
    q, k, v = (torch.randn(batch, S, heads, head_dim, generator=g).to(DEVICE) for _ in range(3))
    num, den = linear_terms(batch, S, heads, head_dim, g)
    size = math.prod(tile)
    check_against_reference(q, k, v, num, den, (index, count, layout.offsets, layout.offsets),
                            dict(max_q_tile=size, max_kv_block=size), 1e-3)


def test_chunked_blocks_and_scale():
    """Key blocks longer than one kernel tile (the chunked path) and a custom scale."""
    g = torch.Generator().manual_seed(3)
    B, H, D, kv_sizes = 1, 2, 16, (140, 30, 70)
    kv_offsets = torch.tensor([0, *torch.tensor(kv_sizes).cumsum(0).tolist()], device=DEVICE)
    S = int(kv_offsets[-1])
    q_offsets = torch.tensor([*range(0, S, 40), S], device=DEVICE)
    index, count = nonempty_selection(B, H, q_offsets.numel() - 1, len(kv_sizes), max_k=2, generator=g)
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(DEVICE) for _ in range(3))
    num, den = linear_terms(B, S, H, D, g)
    check_against_reference(q, k, v, num, den, (index, count, q_offsets, kv_offsets),
                            dict(max_q_tile=40, max_kv_block=140, scale=0.3), 1e-3)


def test_no_linear_mass_is_block_sparse_attention():
    """N = 0 and E = 0: the op is plain block-sparse softmax attention."""
    from surgery.kernels import block_sparse_attention

    g = torch.Generator().manual_seed(4)
    layout = block_layout(VideoGrid(2, 4, 8), (2, 2, 4), DEVICE)
    n, S = layout.num_blocks, layout.order.numel()
    index, count = nonempty_selection(1, 2, n, n, max_k=2, generator=g)
    q, k, v = (torch.randn(1, S, 2, 16, generator=g).to(DEVICE) for _ in range(3))
    args = (index, count, layout.offsets, layout.offsets, 16, 16)
    out = selected_hybrid_attention(q, k, v, torch.zeros_like(q), torch.zeros(1, 2, S, device=DEVICE), *args)
    assert rel_err(out, block_sparse_attention(q, k, v, *args)[0]) <= 1e-6


def test_rejects_bad_arguments():
    layout = block_layout(VideoGrid(2, 4, 8), (2, 2, 4), DEVICE)
    n, S = layout.num_blocks, layout.order.numel()
    q = torch.randn(1, S, 2, 16, device=DEVICE)
    index = torch.zeros(1, 2, n, 1, dtype=torch.int32, device=DEVICE)
    count = torch.ones(1, 2, n, dtype=torch.int32, device=DEVICE)
    den = torch.ones(1, 2, S, device=DEVICE)
    with pytest.raises(ValueError, match="lin_num"):
        selected_hybrid_attention(q, q, q, q[:, :-1], den, index, count, layout.offsets, layout.offsets, 16, 16)
    with pytest.raises(ValueError, match="at least one"):
        selected_hybrid_attention_reference(q, q, q, q, den, index, count * 0, layout.offsets, layout.offsets, 16, 16)


@pytest.mark.parametrize(
    "grid,config",
    [((3, 5, 6), HybridSelectedConfig(tile=(2, 2, 4), top_k=3)),
     ((5, 6, 7), HybridSelectedConfig(top_k=3, feature_dim=8, hidden_dim=4)),
     ((2, 4, 4), HybridSelectedConfig(tile=(2, 2, 2), top_k=8)),
     ((3, 5, 6), HybridSelectedConfig(tile=(2, 2, 4), top_k=2, kind="polynomial"))],
    ids=["partial-2x2x4-k3", "partial-4x4x4-k3-hidden", "every-tile", "polynomial"],
)
def test_variant_kernel_path_matches_reference(grid, config):
    """`hybrid_selected`'s kernel path (tile order, fp32 selection, tile summaries, the op) against its reference
    in fp64: output and the gradients of q, k, v and every feature-map parameter, fp32, relative error ≤ 1e-3."""
    grid, heads, head_dim = VideoGrid(*grid), 2, 16
    torch.manual_seed(0)
    variant = HybridSelectedAttention(config, heads=heads, head_dim=head_dim, dim=heads * head_dim)
    with torch.no_grad():  # a trained-looking map: away from the identity init
        for p in variant.parameters():
            p.add_(0.3 * torch.randn_like(p))
    q, k, v = (torch.randn(2, grid.tokens, heads, head_dim) for _ in range(3))
    upstream = torch.randn(2, grid.tokens, heads, head_dim)
    params = list(variant.parameters())

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = variant.attend_kernel(*leaves, grid)
    grads = torch.autograd.grad(out, leaves + params, upstream, allow_unused=True, materialize_grads=True)
    reference = copy.deepcopy(variant).double()
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference.attend_reference(*ref_leaves, grid)
    ref_grads = torch.autograd.grad(ref, ref_leaves + list(reference.parameters()), upstream.double(),
                                    allow_unused=True, materialize_grads=True)
    assert rel_err(out, ref) <= 1e-3
    names = ["q", "k", "v", *(name for name, _ in variant.named_parameters())]
    for name, g, r in zip(names, grads, ref_grads):
        if r.abs().max() == 0:  # every tile selected: the feature maps take no part
            assert g.abs().max() == 0, name
        else:
            assert rel_err(g, r) <= 1e-3, name


# ---- GPU -------------------------------------------------------------------------------------------
def wan_frame_case(sparsity, dtype, seed, grid=VideoGrid(9, 30, 52)):
    """Wan2.1-1.3B's frame size (30×52) over 9 frames, 4×4×4 tiles, 4 heads × 128, top-k key tiles."""
    g = torch.Generator().manual_seed(seed)
    layout = block_layout(grid, (4, 4, 4), "cuda")
    n, S, H = layout.num_blocks, layout.order.numel(), 4
    top_k = math.ceil((1 - sparsity) * n)
    index = torch.rand(1, H, n, n, generator=g).topk(top_k, dim=-1).indices.int().cuda()
    count = torch.full((1, H, n), top_k, dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(1, S, H, 128, generator=g).cuda().to(dtype) for _ in range(3))
    num, den = linear_terms(1, S, H, 128, g)
    # Linear mass of the size a complement of (1 − k/n)·S keys gives against the selected softmax mass.
    return q, k, v, num.cuda().to(dtype), den.cuda() * 50, (index, count, layout.offsets, layout.offsets)


@gpu
@needs_cuda
@pytest.mark.parametrize("sparsity", [0.875, 0.5])
def test_gpu_wan_tiles_bf16(poisoned_empty, sparsity):
    q, k, v, num, den, args = wan_frame_case(sparsity, torch.bfloat16, 5)
    print(check_against_reference(q, k, v, num, den, args, {}, 1e-2))


@gpu
@needs_cuda
def test_gpu_fp32_head_dim_128(poisoned_empty):
    """fp32 (launch settings fitted to shared memory) on a smaller grid: the reference runs in fp64."""
    q, k, v, num, den, args = wan_frame_case(0.75, torch.float32, 6, VideoGrid(5, 8, 16))
    print(check_against_reference(q, k, v, num, den, args, {}, 1e-3))


@gpu
@needs_cuda
def test_gpu_variant_kernel_path_matches_reference_bf16(poisoned_empty):
    """Wan's heads at a grid with partial 4×4×4 tiles, small enough for the reference's [S, S] scores; bf16 inputs
    and parameters, the reference in fp32 from the same values: relative error ≤ 1e-2 for the output and the
    inputs' gradients, ≤ 2e-2 for the feature maps' (each a sum over every token's bf16 terms)."""
    grid, heads, head_dim = VideoGrid(9, 15, 18), 12, 128
    torch.manual_seed(0)
    variant = HybridSelectedAttention(HybridSelectedConfig(sparsity=0.875), heads=heads, head_dim=head_dim,
                                      dim=heads * head_dim).cuda()
    with torch.no_grad():
        for p in variant.parameters():
            p.add_(0.05 * torch.randn_like(p))
    variant = variant.bfloat16()
    exact = copy.deepcopy(variant).float()
    q, k, v = (torch.randn(1, grid.tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    upstream = torch.randn_like(q)
    out = variant.attend_kernel(q, k, v, grid)
    grads = torch.autograd.grad(out, [q, k, v, *variant.parameters()], upstream)
    ref = exact.attend_reference(q32, k32, v32, grid)
    ref_grads = torch.autograd.grad(ref, [q32, k32, v32, *exact.parameters()], upstream.float())
    names = ["q", "k", "v", *(name for name, _ in variant.named_parameters())]
    errors = {"out": rel_err(out, ref), **{name: rel_err(g, r) for name, g, r in zip(names, grads, ref_grads)}}
    print(errors)
    assert all(e <= (1e-2 if name in ("out", "q", "k", "v") else 2e-2) for name, e in errors.items()), errors


@gpu
@needs_cuda
def test_gpu_repeatable_bit_for_bit():
    """No atomics: outputs and gradients are identical from call to call."""
    q, k, v, num, den, args = wan_frame_case(0.875, torch.bfloat16, 7)
    leaves = [t.requires_grad_() for t in (q, k, v, num, den)]
    upstream = torch.randn_like(q)
    with deterministic_algorithms():
        runs = []
        for _ in range(3):
            out = selected_hybrid_attention(*leaves, *args)
            runs.append([out, *torch.autograd.grad(out, leaves, upstream)])
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))
