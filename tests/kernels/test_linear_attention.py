"""Fused linear-attention kernel (Triton, φ_q and φ_k inside) against the reference: output and the gradients
of q, k, v and both feature maps' W and b.

On CPU the kernels run in Triton's interpreter at tiny shapes with 16-token blocks, 24-token summary chunks
(so chunks end inside a block and the chunk reduction has several terms) and 16-column value slices (partial
last blocks, several heads, batch 2, F ≠ D, L ≠ S); fp32 against the reference in fp64, relative error ≤ 1e-3,
and fp16. Not bf16: the interpreter's tl.dot gets bf16 operands wrong (triton 3.9). The reference is
`FeatureMapAttention.linear_attention_sums` on a copy of the processor, the source of truth of the variant.
Through the variant: `attend_kernel` with the op against `attend_reference`, and its fallbacks. The GPU test
(`-m gpu`) uses Wan-1.3B's shape in bf16, relative error ≤ 2e-2 against the reference in fp32 on the same
bf16 values (a torch emulation of the kernels' bf16 roundings at 2 of its 12 heads gave ≤ 5.5e-3).
"""

import copy

import pytest
import torch
from triton.runtime.jit import JITFunction

from surgery.grid import VideoGrid
from surgery.kernels import linear_attention as la
from surgery.kernels.linear_attention import linear_attention
from surgery.variants.hybrid import linear_token_index
from surgery.variants.linear import LinearAttention, LinearConfig

from .test_hybrid import DEVICE, attend_kernel_errors, gpu, needs_cuda, random_processor, rel_err

GRAD_NAMES = ["q", "k", "v", "feature_map_q.weight", "feature_map_q.bias", "feature_map_k.weight",
              "feature_map_k.bias"]


@pytest.fixture
def small_blocks(monkeypatch):
    """16-token blocks, 24-token summary chunks and 16-column value slices, so the tiny cases cover several of
    each and end on partial ones."""
    for name, config in la.CONFIGS.items():
        monkeypatch.setitem(la.CONFIGS, name, {**config, "BLOCK_S": 16})
    monkeypatch.setitem(la.CONFIGS, "summary", {**la.CONFIGS["summary"], "BLOCK_D": 16, "CHUNK_S": 24})


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many times the op's forward ran: a fallback must not pass for the kernel."""
    calls, forward = [], la.linear_attention_fwd
    monkeypatch.setattr(la, "linear_attention_fwd", lambda *args: calls.append(1) or forward(*args))
    return calls


def feature_map_params(processor):
    return [p for m in (processor.feature_map_q, processor.feature_map_k) for p in (m.weight, m.bias)]


def op_errors(processor, q, k, v, reference_dtype):
    """The op on q, k, v and the processor's feature-map parameters against `linear_attention_sums` of a copy in
    `reference_dtype` on the same values: relative errors of o and of every gradient under one random upstream
    gradient."""
    reference = copy.deepcopy(processor).to(reference_dtype)
    inputs = [t.detach().requires_grad_() for t in (q, k, v)] + feature_map_params(processor)
    ref_inputs = [t.detach().to(reference_dtype).requires_grad_() for t in (q, k, v)] + feature_map_params(reference)
    out = linear_attention(*inputs)
    numerator, denominator = reference.linear_attention_sums(*ref_inputs[:3])
    ref = numerator / denominator
    assert out.shape == ref.shape and out.dtype == q.dtype and out.stride() == q.stride()
    grad = torch.randn_like(ref)
    grads = torch.autograd.grad(out, inputs, grad.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad)
    assert all(torch.isfinite(t).all() for t in [out, *grads])
    return {n: rel_err(a, b) for n, a, b in zip(["o", *GRAD_NAMES], [out, *grads], [ref, *ref_grads])}


@pytest.mark.parametrize(
    "batch,tokens,keys,heads,head_dim,features,heads_first,dtype",
    [
        (2, 37, 37, 3, 32, 16, False, torch.float32),
        (2, 50, 50, 2, 16, 32, False, torch.float32),
        (1, 16, 16, 1, 16, 16, False, torch.float32),
        (2, 21, 40, 3, 16, 16, True, torch.float32),
        (2, 37, 37, 2, 16, 32, False, torch.float16),
    ],
    ids=["S37-d32-F16", "S50-d16-F32", "S16-one-block", "S21-L40-heads-first-layout", "S37-fp16"],
)
def test_matches_reference(
    small_blocks, kernel_calls, poisoned_empty, batch, tokens, keys, heads, head_dim, features, heads_first, dtype
):
    """Random W and b (not the identity init), fresh random q, k, v; fp32 against the reference in fp64
    (≤ 1e-3), fp16 against it in fp32 (≤ 2e-3); NaN-filled allocations, so an element left unwritten fails."""
    processor = random_processor(LinearAttention, LinearConfig(feature_dim=features), heads, head_dim)
    processor = processor.to(DEVICE, dtype)
    q = torch.randn(batch, tokens, heads, head_dim, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(batch, keys, heads, head_dim, device=DEVICE, dtype=dtype) for _ in range(2))
    if heads_first:  # [B, H, S, D] memory seen as [B, S, H, D]: the kernels take the strides
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    reference_dtype, tol = (torch.float64, 1e-3) if dtype == torch.float32 else (torch.float32, 2e-3)
    errors = op_errors(processor, q, k, v, reference_dtype)
    assert kernel_calls
    assert all(e <= tol for e in errors.values()), errors


@pytest.mark.parametrize("keys,dtype,skip_every", [(37, torch.float32, 0), (50, torch.float16, 0), (37, torch.float32, 3),
                                                   (50, torch.float32, 16)])
def test_linear_summary_matches_the_torch_summary(small_blocks, poisoned_empty, keys, dtype, skip_every):
    """The fused summary Σφ_k(k)ᵀ[v, 1] (`hybrid`'s linear keys) against the variant's torch path in fp64 (fp32
    for fp16 inputs): the summary and the gradients of k, v, W and b under a random upstream gradient. With
    skip_every = R the kernel reads all keys and leaves out those at multiples of R; the torch path gets only
    the others (and k, v get zero gradient at the left-out keys)."""
    processor = random_processor(LinearAttention, LinearConfig(feature_dim=16), 3, 32).to(DEVICE, dtype)
    reference = copy.deepcopy(processor).to(torch.float64 if dtype == torch.float32 else torch.float32)
    k, v = (torch.randn(2, keys, 3, 32, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    rk, rv = (t.detach().to(reference.feature_map_k.weight.dtype).requires_grad_() for t in (k, v))
    maps, ref_maps = processor.feature_map_k, reference.feature_map_k
    summary = la.linear_summary(k, v, maps.weight, maps.bias, skip_every)
    kept = linear_token_index(keys, skip_every, k.device) if skip_every else slice(None)
    expected = reference.linear_summary(rk[:, kept], rv[:, kept])
    upstream = torch.randn_like(expected)
    grads = torch.autograd.grad(summary, (k, v, maps.weight, maps.bias), upstream.to(dtype))
    ref_grads = torch.autograd.grad(expected, (rk, rv, ref_maps.weight, ref_maps.bias), upstream)
    errors = [rel_err(a, b) for a, b in zip((summary, *grads), (expected, *ref_grads))]
    assert summary.dtype == dtype and max(errors) <= (1e-3 if dtype == torch.float32 else 2e-3), errors


@gpu
@needs_cuda
def test_gpu_linear_summary_bf16(poisoned_empty):
    """`hybrid`'s linear keys at Wan-1.3B, R = 4 (24,570 of 32,760 keys, 12 heads × 128, F = 128), bf16, read in
    place (skip_every = 4), against the torch summary in fp32 over the same bf16 keys: summary and gradients
    ≤ 2e-2 relative."""
    processor = random_processor(LinearAttention, LinearConfig(feature_dim=128), 12, 128).to("cuda", torch.bfloat16)
    reference = copy.deepcopy(processor).float()
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, 32760, 12, 128, generator=g).cuda().bfloat16().requires_grad_() for _ in range(2))
    rk, rv = (t.detach().float().requires_grad_() for t in (k, v))
    maps, ref_maps = processor.feature_map_k, reference.feature_map_k
    summary = la.linear_summary(k, v, maps.weight, maps.bias, 4)
    kept = linear_token_index(32760, 4, k.device)
    expected = reference.linear_summary(rk[:, kept], rv[:, kept])
    upstream = torch.randn_like(expected)
    grads = torch.autograd.grad(summary, (k, v, maps.weight, maps.bias), upstream.bfloat16())
    ref_grads = torch.autograd.grad(expected, (rk, rv, ref_maps.weight, ref_maps.bias), upstream)
    errors = [rel_err(a, b) for a, b in zip((summary, *grads), (expected, *ref_grads))]
    print(errors)
    assert max(errors) <= 2e-2, errors


def test_variant_attend_kernel_runs_the_op(small_blocks, kernel_calls):
    """`attend_kernel` (what `attend` runs on CUDA) against `attend_reference`, both fp32: the output and the
    gradients of q, k, v and every feature-map parameter, with the op doing the work."""
    processor = random_processor(LinearAttention, LinearConfig(feature_dim=32), 2, 16).to(DEVICE)
    errors = attend_kernel_errors(processor, VideoGrid(2, 3, 5))
    assert len(kernel_calls) == 1
    assert all(e <= 1e-3 for e in errors.values()), errors


@pytest.mark.parametrize(
    "head_dim,config,dtype",
    [
        (16, LinearConfig(feature_dim=16, hidden_dim=4), torch.float32),
        (12, LinearConfig(feature_dim=16), torch.float32),
        (16, LinearConfig(feature_dim=8), torch.float32),
        (16, LinearConfig(), torch.float64),
    ],
    ids=["hidden-layer", "head-dim-12", "F8", "fp64"],
)
def test_variant_falls_back_where_the_op_does_not_apply(kernel_calls, head_dim, config, dtype):
    """A second feature-map layer, a head dim or F that is not a power of two ≥ 16, or fp64: `attend_kernel`
    takes the previous path (feature maps, then torch matmuls), which still matches `attend_reference`."""
    processor = random_processor(LinearAttention, config, 2, head_dim).to(DEVICE, dtype)
    q, k, v = (torch.randn(1, 6, 2, head_dim, device=DEVICE, dtype=dtype) for _ in range(3))
    out, ref = processor.attend_kernel(q, k, v, None), processor.attend_reference(q, k, v, None)
    assert not kernel_calls
    assert rel_err(out, ref) <= 1e-5


def test_cpu_without_interpreter_falls_back(monkeypatch, kernel_calls):
    """On CPU tensors the op runs only in the interpreter; compiled (a JITFunction) it is not called."""
    monkeypatch.setattr(la, "linear_attention_fwd_kernel", JITFunction(la.linear_attention_fwd_kernel.fn))
    processor = random_processor(LinearAttention, LinearConfig(), 2, 16)
    q, k, v = (torch.randn(1, 5, 2, 16) for _ in range(3))
    assert rel_err(processor.attend_kernel(q, k, v, None), processor.attend_reference(q, k, v, None)) <= 1e-5
    assert not kernel_calls
    with pytest.raises(ValueError, match="need CUDA or Triton's interpreter"):
        linear_attention(q, k, v, *feature_map_params(processor))


def test_rejects_bad_arguments():
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    weight, bias = torch.randn(2, 16, 16), torch.randn(2, 16)
    with pytest.raises(ValueError, match="k and v must be"):
        linear_attention(q, k[:, :, :1], v, weight, bias, weight, bias)
    with pytest.raises(ValueError, match="φ_k's weight must be"):
        linear_attention(q, k, v, weight, bias, weight[..., :8], bias)
    with pytest.raises(ValueError, match="q's dtype"):
        linear_attention(q, k.double(), v, weight, bias, weight, bias)
    with pytest.raises(ValueError, match="feature_dim must be a power of two"):
        linear_attention(q, k, v, weight[..., :12], bias[..., :12], weight[..., :12], bias[..., :12])


# ---- GPU: Wan-1.3B's shape in bf16 ----------------------------------------------------------------


@gpu
@needs_cuda
def test_gpu_wan_shape_bf16(poisoned_empty, kernel_calls):
    """21×30×52 = 32,760 tokens, 12 heads × 128, F = 128, bf16, parameters near the identity init as in training;
    the reference in fp32 on the same bf16 values. Running the backward twice must give the same bits (the
    chunk reductions are deterministic)."""
    heads, head_dim = 12, 128
    processor = LinearAttention(LinearConfig(), heads=heads, head_dim=head_dim, dim=heads * head_dim)
    with torch.no_grad():
        for feature_map in (processor.feature_map_q, processor.feature_map_k):
            feature_map.weight.add_(0.5 * head_dim ** -0.5 * torch.randn_like(feature_map.weight))
            feature_map.bias.copy_(0.5 * torch.randn_like(feature_map.bias))
    processor = processor.to("cuda", torch.bfloat16)
    q, k, v = (torch.randn(1, VideoGrid(21, 30, 52).tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    errors = op_errors(processor, q, k, v, torch.float32)
    print(errors)
    assert kernel_calls
    assert all(e <= 2e-2 for e in errors.values()), errors
    inputs = [t.detach().requires_grad_() for t in (q, k, v)] + feature_map_params(processor)
    grad = torch.randn_like(q)
    first, second = (torch.autograd.grad(linear_attention(*inputs), inputs, grad) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
