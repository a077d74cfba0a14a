"""Fused feature-map kernel (Triton) against the reference `FeatureMap.forward`: φ and the gradients of x, W, b.

On CPU the kernel runs in Triton's interpreter at tiny shapes with 16-token blocks (partial last blocks,
several heads, batch 2, F ≠ D); fp32 against the reference in fp64, relative error ≤ 1e-3, and fp16. Not
bf16: the interpreter's tl.dot gets bf16 operands wrong (triton 3.9; the hybrid kernel's too). Through the
hybrid variant: `attend_kernel` with the kernel bound against `attend_reference`. The GPU test (`-m gpu`) uses
Wan-1.3B's shape in bf16, relative error ≤ 1e-2 against the reference in fp32 on the same bf16 values.
"""

import copy

import pytest
import torch
from triton.runtime.jit import JITFunction

from surgery.grid import VideoGrid
from surgery.kernels import feature_map as fm
from surgery.kernels.feature_map import feature_map
from surgery.variants.feature_maps import FeatureMap
from surgery.variants.hybrid import HybridAttention, HybridConfig

from .test_hybrid import DEVICE, attend_kernel_errors, gpu, needs_cuda, random_processor, rel_err


@pytest.fixture
def small_blocks(monkeypatch):
    """16-token blocks, so the tiny cases cover several blocks and end on a partial one."""
    for name, config in fm.CONFIGS.items():
        monkeypatch.setitem(fm.CONFIGS, name, {**config, "BLOCK_S": 16})


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many times the kernel's forward ran: a fallback to the reference must not pass for the kernel."""
    calls, forward = [], fm.feature_map_fwd
    monkeypatch.setattr(fm, "feature_map_fwd", lambda *args: calls.append(1) or forward(*args))
    return calls


def random_feature_map(heads, head_dim, features, hidden_dim=0):
    """A FeatureMap with random parameters (its init is an identity and zeros)."""
    module = FeatureMap(heads, head_dim, features, hidden_dim)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    return module


def kernel_errors(feature_map_module, x, reference_dtype):
    """`forward_kernel` on x against the reference `forward` of a copy in `reference_dtype`, on the same values:
    relative errors of φ and of the gradients of x, W and b under one random upstream gradient."""
    reference_map = copy.deepcopy(feature_map_module).to(reference_dtype)
    x, x_ref = x.detach().requires_grad_(), x.detach().to(reference_dtype).requires_grad_()
    phi, ref = feature_map_module.forward_kernel(x), reference_map(x_ref)
    assert phi.shape == ref.shape and phi.dtype == x.dtype
    grad = torch.randn_like(ref)
    grads = torch.autograd.grad(phi, [x, feature_map_module.weight, feature_map_module.bias], grad.to(phi.dtype))
    ref_grads = torch.autograd.grad(ref, [x_ref, reference_map.weight, reference_map.bias], grad)
    assert all(torch.isfinite(t).all() for t in [phi, *grads])
    return {n: rel_err(a, b) for n, a, b in zip(["phi", "dx", "dW", "db"], [phi, *grads], [ref, *ref_grads])}


@pytest.mark.parametrize(
    "batch,tokens,heads,head_dim,features,heads_first,dtype",
    [
        (2, 37, 3, 16, 32, False, torch.float32),
        (2, 50, 2, 32, 16, False, torch.float32),
        (1, 16, 1, 16, 16, False, torch.float32),
        (2, 21, 3, 16, 32, True, torch.float32),
        (2, 37, 3, 16, 32, False, torch.float16),
    ],
    ids=["S37-d16-F32", "S50-d32-F16", "S16-one-full-block", "S21-heads-first-layout", "S37-fp16"],
)
def test_matches_reference(
    small_blocks, kernel_calls, poisoned_empty, batch, tokens, heads, head_dim, features, heads_first, dtype
):
    """fp32 against the reference in fp64 (≤ 1e-3), fp16 against it in fp32 (≤ 2e-3; torch's own fp16 path is
    at 1e-3); NaN-filled allocations, so an element the kernel leaves unwritten fails."""
    feature_map_module = random_feature_map(heads, head_dim, features).to(DEVICE, dtype)
    x = torch.randn(batch, tokens, heads, head_dim, device=DEVICE, dtype=dtype)
    if heads_first:  # [B, H, S, D] memory seen as [B, S, H, D]: the kernel takes x's strides
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    reference_dtype, tol = (torch.float64, 1e-3) if dtype == torch.float32 else (torch.float32, 2e-3)
    errors = kernel_errors(feature_map_module, x, reference_dtype)
    assert kernel_calls
    assert all(e <= tol for e in errors.values()), errors


@pytest.mark.parametrize(
    "head_dim,features,hidden_dim,dtype",
    [(16, 16, 4, torch.float32), (12, 16, 0, torch.float32), (16, 8, 0, torch.float32), (16, 16, 0, torch.float64)],
    ids=["hidden-layer", "head-dim-12", "F8", "fp64"],
)
def test_forward_kernel_falls_back_to_reference(kernel_calls, head_dim, features, hidden_dim, dtype):
    """Where the op does not apply, `forward_kernel` is `forward` itself, bit for bit."""
    feature_map_module = random_feature_map(2, head_dim, features, hidden_dim).to(DEVICE, dtype)
    x = torch.randn(1, 5, 2, head_dim, dtype=dtype, device=DEVICE)
    assert torch.equal(feature_map_module.forward_kernel(x), feature_map_module(x))
    assert not kernel_calls


def test_cpu_without_interpreter_falls_back(monkeypatch, kernel_calls):
    """On CPU tensors the kernel runs only in the interpreter; compiled (a JITFunction) it is not called."""
    monkeypatch.setattr(fm, "feature_map_fwd_kernel", JITFunction(fm.feature_map_fwd_kernel.fn))
    feature_map_module = random_feature_map(2, 16, 16)
    x = torch.randn(1, 5, 2, 16)
    assert torch.equal(feature_map_module.forward_kernel(x), feature_map_module(x))
    assert not kernel_calls
    with pytest.raises(ValueError, match="need CUDA or Triton's interpreter"):
        feature_map(x, feature_map_module.weight, feature_map_module.bias)


def test_rejects_bad_arguments():
    x, weight, bias = torch.randn(1, 8, 2, 16), torch.randn(2, 16, 16), torch.randn(2, 16)
    with pytest.raises(ValueError, match="weight must be"):
        feature_map(x, weight[:1], bias)
    with pytest.raises(ValueError, match="x's dtype"):
        feature_map(x, weight.double(), bias)
    with pytest.raises(ValueError, match="feature_dim must be a power of two"):
        feature_map(x, weight[..., :12], bias[..., :12])


def test_hybrid_attend_kernel_matches_reference(small_blocks, kernel_calls):
    """The hybrid variant's `attend_kernel` (φ_q through the kernel; φ_k inside the linear summary op of
    tests/kernels/test_linear_attention.py) against `attend_reference`, both fp32: the output and the gradients
    of q, k, v and every feature-map parameter. (The linear variant runs φ inside its own op.)"""
    processor = random_processor(HybridAttention, HybridConfig(rate=4, feature_dim=16), 2, 16).to(DEVICE)
    errors = attend_kernel_errors(processor, VideoGrid(2, 3, 5))
    assert len(kernel_calls) == 1
    assert all(e <= 1e-3 for e in errors.values()), errors


# ---- GPU: Wan-1.3B's shape in bf16 ----------------------------------------------------------------


@gpu
@needs_cuda
def test_gpu_wan_shape_bf16(poisoned_empty, kernel_calls):
    """21×30×52 = 32,760 tokens, 12 heads × 128, F = 128, bf16 through `forward_kernel` as the variants call
    it; the reference in fp32 on the same bf16 x, W and b. Parameters near the identity init, as in training."""
    heads, head_dim = 12, 128
    feature_map_module = FeatureMap(heads, head_dim, head_dim, 0)
    with torch.no_grad():
        feature_map_module.weight.add_(0.5 * head_dim ** -0.5 * torch.randn_like(feature_map_module.weight))
        feature_map_module.bias.copy_(0.5 * torch.randn_like(feature_map_module.bias))
    feature_map_module = feature_map_module.to("cuda", torch.bfloat16)
    x = torch.randn(1, VideoGrid(21, 30, 52).tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    errors = kernel_errors(feature_map_module, x, torch.float32)
    print(errors)
    assert kernel_calls
    assert all(e <= 1e-2 for e in errors.values()), errors
