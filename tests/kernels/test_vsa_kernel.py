"""The `vsa` variant's kernel path (Triton block-sparse fine stage) against its PyTorch reference.

CPU: the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) on
small grids with partial tiles; fp32, relative error ≤ 1e-3 on the output and every gradient.
"""

import pytest
import torch

from surgery.grid import VideoGrid
from surgery.variants.vsa import VideoSparseAttention, VSAConfig


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(
    "grid,tile,top_k",
    [((5, 6, 7), (4, 4, 4), 3), ((3, 5, 6), (2, 2, 2), 5), ((2, 4, 4), (2, 2, 2), 4)],
    ids=["partial-4x4x4", "partial-2x2x2", "exact-2x2x2"],
)
def test_kernel_path_matches_reference(grid, tile, top_k):
    grid = VideoGrid(*grid)
    heads, head_dim, dim, batch = 2, 16, 32, 2
    torch.manual_seed(0)
    variant = VideoSparseAttention(VSAConfig(tile=tile, top_k=top_k), heads=heads, head_dim=head_dim, dim=dim)
    with torch.no_grad():  # a trained gate, so the coarse path counts
        variant.gate_compress.weight.normal_(0, 0.2)
        variant.gate_compress.bias.normal_(0, 0.2)
    q, k, v = (torch.randn(batch, grid.tokens, heads, head_dim, requires_grad=True) for _ in range(3))
    x = torch.randn(batch, grid.tokens, dim, requires_grad=True)
    upstream = torch.randn(batch, grid.tokens, heads, head_dim)

    results = []
    for attend in (variant.attend_kernel, variant.attend_reference):
        out = attend(q, k, v, grid, x)
        params = [q, k, v, x, variant.gate_compress.weight, variant.gate_compress.bias]
        grads = torch.autograd.grad(out, params, upstream)
        results.append((out.detach(), grads))
    (out_kernel, grads_kernel), (out_ref, grads_ref) = results
    assert relative_error(out_kernel, out_ref) <= 1e-3
    for name, a, b in zip(("q", "k", "v", "x", "gate.weight", "gate.bias"), grads_kernel, grads_ref):
        assert relative_error(a, b) <= 1e-3, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_path_matches_reference_on_gpu_in_bf16(poisoned_empty):
    # Wan's heads at a grid with partial 4×4×4 tiles, small enough for the reference's [S, S] scores.
    # bf16 inputs; the reference computes in fp32 from the same values: relative error ≤ 1e-2.
    grid, heads, head_dim, dim = VideoGrid(9, 15, 18), 12, 128, 1536
    torch.manual_seed(0)
    variant = VideoSparseAttention(VSAConfig(tile=(4, 4, 4), sparsity=0.875), heads=heads, head_dim=head_dim,
                                   dim=dim).cuda().bfloat16()
    with torch.no_grad():
        variant.gate_compress.weight.normal_(0, 0.02)
        variant.gate_compress.bias.normal_(0, 0.2)
    q, k, v = (torch.randn(1, grid.tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    x = torch.randn(1, grid.tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn(1, grid.tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    results = []
    for attend in (variant.attend_kernel, variant.attend_reference):
        out = attend(q, k, v, grid, x)
        results.append((out.detach(), torch.autograd.grad(out, [q, k, v, x, variant.gate_compress.weight], upstream)))
    (out_kernel, grads_kernel), (out_ref, grads_ref) = results
    errors = {"out": relative_error(out_kernel, out_ref)}
    errors |= {name: relative_error(a, b) for name, a, b in zip(("q", "k", "v", "x", "gate"), grads_kernel, grads_ref)}
    print(errors)
    assert all(error <= 1e-2 for error in errors.values()), errors
