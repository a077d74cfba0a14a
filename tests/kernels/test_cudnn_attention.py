"""cuDNN's SDPA ops as `cudnn_attention` calls them, against their PyTorch definitions.

CPU: the installed torch has the ops with the argument orders passed (else every caller falls back to Triton, and
this says so), and the two references agree with autograd. GPU (`-m gpu`): cuDNN against the references in fp32 on
the same bf16 inputs, relative error ≤ 1e-2, including strided heads-first views and a key count that is not a
multiple of cuDNN's tiles.
"""

import pytest
import torch

from surgery.kernels.cudnn_attention import (attention_backward_reference, attention_forward_reference,
                                             cudnn_attention_applies, cudnn_attention_backward,
                                             cudnn_attention_forward, cudnn_ops_available)

from .conftest import deterministic_algorithms

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def test_installed_torch_has_the_ops_we_call():
    assert cudnn_ops_available()


def test_references_match_autograd():
    """The backward reference, handed the forward's o and lse, gives autograd's gradients of the forward."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g, dtype=torch.float64) for n in (11, 7, 7))
    do = torch.randn(2, 3, 11, 16, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = attention_forward_reference(*leaves, 0.3)
    torch.testing.assert_close(lse, (torch.einsum("bhsd,bhtd->bhst", q, k) * 0.3).logsumexp(-1))
    o.backward(do)
    grads = attention_backward_reference(do, q, k, v, o.detach(), lse, 0.3)
    for grad, leaf in zip(grads, leaves):
        torch.testing.assert_close(grad, leaf.grad)


def test_not_on_cpu():
    assert not cudnn_attention_applies(torch.zeros(1, 2, 4, 16, dtype=torch.bfloat16), backward=False)


@gpu
@needs_cuda
def test_gpu_applies_and_deterministic_mode():
    q = torch.zeros(1, 2, 4, 128, device="cuda", dtype=torch.bfloat16)
    assert cudnn_attention_applies(q, backward=True) and not cudnn_attention_applies(q.float(), backward=False)
    with deterministic_algorithms():
        assert cudnn_attention_applies(q, backward=False) and not cudnn_attention_applies(q, backward=True)


@gpu
@needs_cuda
@pytest.mark.parametrize("queries,keys", [(1000, 4680), (333, 455)])
def test_gpu_matches_references(queries, keys):
    g = torch.Generator().manual_seed(queries)
    # Heads-first views of [B, S, H, D] tensors, as the callers pass them.
    q, do = (torch.randn(2, queries, 3, 128, generator=g).cuda().bfloat16().transpose(1, 2) for _ in range(2))
    k, v = (torch.randn(2, keys, 3, 128, generator=g).cuda().bfloat16().transpose(1, 2) for _ in range(2))
    o, lse = cudnn_attention_forward(q, k, v, 0.09)
    ref_o, ref_lse = attention_forward_reference(q.float(), k.float(), v.float(), 0.09)
    assert o.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert rel_err(o, ref_o) <= 1e-2 and rel_err(lse, ref_lse) <= 1e-3
    grads = cudnn_attention_backward(do, q, k, v, o, lse, 0.09)
    ref_grads = attention_backward_reference(do.float(), q.float(), k.float(), v.float(), o.float(), lse, 0.09)
    errors = [rel_err(grad, ref) for grad, ref in zip(grads, ref_grads)]
    assert all(e <= 1e-2 for e in errors), errors
