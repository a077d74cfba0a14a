"""The `vmoba` variant's kernel path (Triton attention over each query's chosen blocks) against its
PyTorch reference. CPU: Triton's interpreter, small grids with partial blocks, fp32, ≤ 1e-3 relative."""

import pytest
import torch

from surgery.grid import VideoGrid
from surgery.variants.vmoba import VideoMixtureOfBlockAttention, VMoBAConfig


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("partition", ["1d", "2d", "3d"])
@pytest.mark.parametrize("select", ["threshold", "topk"])
def test_kernel_path_matches_reference(partition, select):
    grid = VideoGrid(4, 5, 6)
    heads, head_dim, batch = 2, 16, 2
    config = VMoBAConfig(partition=partition, block_1d=1, block_2d=(2, 3), block_3d=(2, 2, 3), select=select,
                         threshold=0.3, top_k=(2, 3, 4))
    variant = VideoMixtureOfBlockAttention(config, heads=heads, head_dim=head_dim, dim=heads * head_dim)
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, grid.tokens, heads, head_dim, requires_grad=True) for _ in range(3))
    upstream = torch.randn(batch, grid.tokens, heads, head_dim)
    results = []
    for attend in (variant.attend_kernel, variant.attend_reference):
        out = attend(q, k, v, grid)
        results.append((out.detach(), torch.autograd.grad(out, (q, k, v), upstream), variant.last_density))
    (out_kernel, grads_kernel, density_kernel), (out_ref, grads_ref, density_ref) = results
    assert density_kernel == density_ref < 1.0  # the same selection, and a sparse one
    assert relative_error(out_kernel, out_ref) <= 1e-3
    for name, a, b in zip("qkv", grads_kernel, grads_ref):
        assert relative_error(a, b) <= 1e-3, name
