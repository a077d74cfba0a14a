"""Every variant's kernel path gives bit-identical results from call to call under
`torch.use_deterministic_algorithms` (GPU only).

Our kernels have no atomics there, so nothing in them may depend on timing (outside that mode the
hybrid's backward takes cuDNN's, which accumulates dq atomically). A GPU run once caught a
software-pipelining race in the hybrid forward (Triton 3.6, H100): about 12% of the output elements
changed from call to call while lse did not, which tolerance tests against the reference could not see.
"""

import pytest
import torch

from surgery.grid import VideoGrid
from surgery.variants import VARIANTS

from .conftest import deterministic_algorithms

GRID, HEADS, HEAD_DIM = VideoGrid(21, 30, 52), 12, 128  # Wan2.1-1.3B's self-attention


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name,params,layer", [
    ("vsa", {"sparsity": 0.875}, 0),
    ("vmoba", {"select": "threshold", "threshold": 0.25}, 2),
    ("hybrid", {"rate": 8}, 0),
    ("hybrid_selected", {"sparsity": 0.875}, 0),
    ("linear", {}, 0),
], ids=["vsa", "vmoba-3d", "hybrid-r8", "hybrid-selected", "linear"])
def test_kernel_path_is_repeatable_bit_for_bit(name, params, layer):
    cls = VARIANTS[name]
    torch.manual_seed(0)
    variant = cls(cls.Config(**params), heads=HEADS, head_dim=HEAD_DIM, dim=HEADS * HEAD_DIM, layer_index=layer)
    variant = variant.cuda().bfloat16()
    with torch.no_grad():  # trained-looking parameters: vsa's gate starts at zero
        for p in variant.parameters():
            p.normal_(0, 0.02)
    make = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    q, k, v = (make(1, GRID.tokens, HEADS, HEAD_DIM).requires_grad_() for _ in range(3))
    x = make(1, GRID.tokens, HEADS * HEAD_DIM).requires_grad_()
    upstream = make(1, GRID.tokens, HEADS, HEAD_DIM)
    leaves = [q, k, v, x, *variant.parameters()]

    runs = []
    with deterministic_algorithms():
        for _ in range(3):
            out = variant.attend_kernel(q, k, v, GRID, x)
            grads = torch.autograd.grad(out, leaves, upstream, allow_unused=True)
            runs.append([out.detach()] + [g for g in grads if g is not None])
    for run in runs[1:]:
        changed = [int((a != b).sum()) for a, b in zip(run, runs[0])]
        assert not any(changed), f"elements that changed between calls (out, then gradients): {changed}"
    with torch.no_grad():  # the inference forward has its own launch settings (and, for some variants, path)
        outputs = [variant.attend_kernel(q, k, v, GRID, x) for _ in range(3)]
    changed = [int((out != outputs[0]).sum()) for out in outputs[1:]]
    assert not any(changed), f"inference outputs that changed between calls: {changed}"
