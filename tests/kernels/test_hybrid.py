"""Hybrid attention kernel (Triton) against its plain-PyTorch reference: output and every gradient.

On CPU the kernels run in Triton's interpreter (tests/kernels/__init__.py) at tiny shapes with 16-token
blocks, so partial blocks and several blocks per walk are covered; fp32 against the reference in fp64,
relative error ≤ 1e-3. Through the variants: `attend_kernel` against `attend_reference`, feature-map
parameters included. GPU tests (`-m gpu`) use Wan-1.3B's shape in bf16, relative error ≤ 2e-2 against
the reference in fp32 on the same bf16 inputs.
"""

import pytest
import torch

from surgery.grid import VideoGrid
from surgery.kernels import hybrid as hy
from surgery.kernels.cudnn_attention import attention_backward_reference
from surgery.kernels.hybrid import hybrid_attention, hybrid_attention_reference
from surgery.variants.hybrid import HybridAttention, HybridConfig, linear_token_index
from surgery.variants.linear import LinearAttention, LinearConfig

from .conftest import deterministic_algorithms

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(x, ref):
    """‖x − ref‖ / ‖ref‖; absolute where ref is exactly zero (dq, dk with a single softmax key)."""
    diff, norm = (x.double() - ref.double()).norm(), ref.double().norm()
    return (diff / norm if norm > 0 else diff).item()


@pytest.fixture
def small_blocks(monkeypatch):
    """16-token query and key blocks, so the tiny cases walk several blocks and end on partial ones."""
    for name, config in hy.CONFIGS.items():
        monkeypatch.setitem(hy.CONFIGS, name, {**config, **{b: 16 for b in ("BLOCK_M", "BLOCK_N") if b in config}})


def random_inputs(batch, tokens, heads, head_dim, features, rate, generator, dtype=torch.float32, device=DEVICE):
    """q, k, v and a linear branch built as the variant builds it: φ positive, KV = φ_k(K_L)ᵀ[V_L, 1]."""
    q, k, v = (torch.randn(batch, tokens, heads, head_dim, generator=generator) for _ in range(3))
    index = linear_token_index(tokens, rate, torch.device("cpu"))
    if features == 0 or index.numel() == 0:
        phi_q = kv = None
    else:
        phi_q = torch.randn(batch, tokens, heads, 2 * features, generator=generator).softmax(-1)
        phi_k = torch.randn(batch, index.numel(), heads, 2 * features, generator=generator).softmax(-1)
        v_ones = torch.cat([v[:, index], torch.ones(batch, index.numel(), heads, 1)], -1)
        kv = torch.einsum("blhf,blhe->bhfe", phi_k, v_ones)  # [B, H, 2F, D+1]
    return [None if t is None else t.to(device, dtype) for t in (q, k, v, phi_q, kv)]


def check_against_reference(inputs, rate, tol, scale=None):
    """Kernel and reference on the same inputs (reference in fp64 for fp32 inputs, else fp32): out and
    the gradients of q, k, v, φ_q and KV under one random upstream gradient."""
    names = ["q", "k", "v", "phi_q", "kv"]
    ours = [None if t is None else t.detach().requires_grad_() for t in inputs]
    ref_dtype = torch.float64 if inputs[0].dtype == torch.float32 else torch.float32
    theirs = [None if t is None else t.detach().to(ref_dtype).requires_grad_() for t in inputs]
    out = hybrid_attention(*ours, rate, scale)
    ref = hybrid_attention_reference(*theirs, rate, scale)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.to(ref_dtype))
    errors = {"out": rel_err(out, ref)}
    errors.update({f"d{n}": rel_err(a.grad, b.grad) for n, a, b in zip(names, ours, theirs) if a is not None})
    assert all(e <= tol for e in errors.values()), errors
    return errors


@pytest.mark.parametrize(
    "tokens,rate,batch,heads,head_dim,features",
    [(70, 2, 2, 2, 16, 8), (53, 4, 2, 3, 32, 12), (37, 5, 2, 2, 16, 16), (45, 1, 2, 2, 16, 8), (33, 40, 1, 2, 16, 8)],
    ids=["S70-R2-d16-F8", "S53-R4-d32-F12", "S37-R5-d16-F16", "S45-R1-full", "S33-R40-one-softmax-key"],
)
def test_matches_reference(small_blocks, tokens, rate, batch, heads, head_dim, features):
    g = torch.Generator().manual_seed(tokens * 100 + rate)
    check_against_reference(random_inputs(batch, tokens, heads, head_dim, features, rate, g), rate, 1e-3)


@pytest.mark.parametrize("tokens,rate,features", [(70, 2, 8), (53, 4, 12), (45, 1, 8)], ids=["S70-R2", "S53-R4", "S45-R1-full"])
def test_inference_forward(small_blocks, tokens, rate, features):
    """Under no_grad the forward skips the backward's statistics (lse, den, argmax): same output."""
    g = torch.Generator().manual_seed(tokens + 7 * rate)
    inputs = random_inputs(2, tokens, 3, 16, features, rate, g)
    with torch.no_grad():
        out = hybrid_attention(*inputs, rate)
    ref = hybrid_attention_reference(*[None if t is None else t.double() for t in inputs], rate)
    assert rel_err(out, ref) <= 1e-3


@pytest.mark.parametrize("min_programs", [1, 24, 10**6], ids=["one-query-chunk", "some-chunks", "chunk-per-block"])
def test_dkv_query_chunks(small_blocks, monkeypatch, min_programs):
    """dk, dv from one pass over all queries, or summed over query chunks (few softmax keys): same result."""
    monkeypatch.setattr(hy, "DKV_MIN_PROGRAMS", min_programs)
    g = torch.Generator().manual_seed(11)
    check_against_reference(random_inputs(2, 70, 2, 16, 8, 4, g), 4, 1e-3)


def test_max_gradient_matters(small_blocks):
    """The linear term is not scaled by exp(−c), so c's gradient is part of dq and dk: dropping it must fail."""
    g = torch.Generator().manual_seed(7)
    q, k, v, phi_q, kv = random_inputs(1, 40, 2, 16, 8, 2, g)
    q = q.requires_grad_()
    hybrid_attention(q, k, v, phi_q, kv, 2).backward(torch.ones_like(q))
    reference = q.detach().double().requires_grad_()
    scores = torch.einsum("bshd,bthd->bhst", reference, k[:, ::2].double()) / 4
    c = scores.amax(-1, keepdim=True).detach()  # the max held constant: what the kernel must not compute
    weights = (scores - c).exp()
    lin = torch.einsum("bshf,bhfe->bshe", phi_q.double(), kv.double())
    out = (torch.einsum("bhst,bthd->bshd", weights, v[:, ::2].double()) + lin[..., :-1]) / (
        weights.sum(-1).transpose(1, 2).unsqueeze(-1) + lin[..., -1:])
    out.backward(torch.ones_like(out))
    assert rel_err(q.grad, reference.grad) > 1e-2


def test_heads_first_layout_and_scale(small_blocks):
    """[B, H, S, D] tensors go in as transposed views; the output keeps q's strides."""
    g = torch.Generator().manual_seed(3)
    q, k, v, phi_q, kv = random_inputs(2, 50, 3, 16, 8, 3, g)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    check_against_reference([q, k, v, phi_q, kv], 3, 1e-3, scale=0.4)
    assert hybrid_attention(q, k, v, phi_q, kv, 3).stride() == q.stride()


def test_keys_in_a_layout_tma_cannot_read(small_blocks):
    """Keys whose rows break TMA's 16-byte rules (a [.., D+1] buffer cut to D) load from a compact copy: same
    results. Strided views k[:, ::R] of a contiguous k are read in place."""
    g = torch.Generator().manual_seed(5)
    q, k, v, phi_q, kv = random_inputs(2, 50, 3, 16, 8, 3, g)
    k_odd, v_odd = (torch.cat([t, torch.zeros_like(t[..., :1])], -1)[..., :-1] for t in (k, v))
    assert k_odd.stride(2) * k_odd.element_size() % 16 != 0
    check_against_reference([q, k_odd, v_odd, phi_q, kv], 3, 1e-3)
    assert hy.row_blocks(k_odd[:, ::3], 16).base.data_ptr() != k_odd.data_ptr()
    assert hy.row_blocks(k[:, ::3], 16).base.data_ptr() == k.data_ptr()


@pytest.mark.parametrize(
    "tokens,rate,batch,heads,head_dim,features",
    [(70, 2, 2, 2, 16, 8), (53, 4, 2, 3, 32, 12), (45, 1, 2, 2, 16, 8), (33, 40, 1, 2, 16, 8)],
    ids=["S70-R2-d16-F8", "S53-R4-d32-F12", "S45-R1-full", "S33-R40-one-softmax-key"],
)
def test_backward_through_a_softmax_backward(small_blocks, monkeypatch, tokens, rate, batch, heads, head_dim,
                                             features):
    """The GPU path's backward (module docstring): the softmax terms from a plain softmax-attention
    backward on (do, o, lse) — here the PyTorch stand-in for cuDNN's — plus the max-gradient kernel."""
    monkeypatch.setattr(hy, "cudnn_attention_backward", attention_backward_reference)
    monkeypatch.setattr(hy, "softmax_backward_for", lambda q: hy.cudnn_softmax_backward)
    g = torch.Generator().manual_seed(tokens * 100 + rate + 1)
    check_against_reference(random_inputs(batch, tokens, heads, head_dim, features, rate, g), rate, 1e-3)


def test_backward_on_cpu_runs_the_recompute_passes():
    assert hy.softmax_backward_for(torch.zeros(1, 4, 1, 16)) is None


@gpu
@needs_cuda
def test_gpu_backward_path_choice():
    """cuDNN for half precision on CUDA, but not for fp32 or under `torch.use_deterministic_algorithms`."""
    q = torch.zeros(1, 4, 1, 16, device="cuda", dtype=torch.bfloat16)
    assert hy.softmax_backward_for(q) is hy.cudnn_softmax_backward
    assert hy.softmax_backward_for(q.float()) is None
    with deterministic_algorithms():
        assert hy.softmax_backward_for(q) is None


def random_processor(cls, config, heads, head_dim):
    """A processor in fp32 with every feature-map parameter random (the init has zeros and an identity)."""
    processor = cls(config, heads=heads, head_dim=head_dim, dim=heads * head_dim)
    with torch.no_grad():
        for p in processor.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    return processor


def attend_kernel_errors(processor, grid):
    """A processor's `attend_kernel` against its `attend_reference` on fresh random q, k, v [2, S, H, D] in fp32:
    relative errors of the output and of the gradients of q, k, v and every parameter under one random upstream
    gradient."""
    q, k, v = (torch.randn(2, grid.tokens, processor.heads, processor.head_dim, device=DEVICE, requires_grad=True)
               for _ in range(3))
    inputs = [q, k, v, *processor.parameters()]
    out, ref = processor.attend_kernel(q, k, v, grid), processor.attend_reference(q, k, v, grid)
    grad = torch.randn_like(ref)
    grads = torch.autograd.grad(out, inputs, grad, materialize_grads=True)
    ref_grads = torch.autograd.grad(ref, inputs, grad, materialize_grads=True)
    names = ["out", "q", "k", "v", *(n for n, _ in processor.named_parameters())]
    return {n: rel_err(a, b) for n, a, b in zip(names, [out, *grads], [ref, *ref_grads])}


@pytest.mark.parametrize(
    "cls,config,grid",
    [
        (HybridAttention, HybridConfig(rate=4, feature_dim=12, hidden_dim=4), VideoGrid(3, 4, 5)),
        (HybridAttention, HybridConfig(rate=5, feature_dim=8), VideoGrid(2, 5, 7)),
        (HybridAttention, HybridConfig(rate=1), VideoGrid(2, 3, 5)),
        (HybridAttention, HybridConfig(rate=3, feature_dim=16), VideoGrid(2, 5, 7)),  # fused linear summary
        (LinearAttention, LinearConfig(feature_dim=8, hidden_dim=4), VideoGrid(3, 4, 5)),
    ],
    ids=["hybrid-R4-hidden", "hybrid-R5", "hybrid-R1", "hybrid-R3-fused-summary", "linear"],
)
def test_variant_attend_kernel_matches_reference(small_blocks, cls, config, grid):
    """`attend_kernel` (what `attend` runs on CUDA) against `attend_reference`, both in fp32, called
    directly (on CPU tensors without CUDA): output and the gradients of q, k, v and every feature-map parameter."""
    errors = attend_kernel_errors(random_processor(cls, config, 2, 16).to(DEVICE), grid)
    assert all(e <= 1e-3 for e in errors.values()), errors


@pytest.mark.parametrize(
    "config,grid",
    [(HybridConfig(rate=3, feature_dim=16), VideoGrid(2, 5, 7)), (HybridConfig(rate=4, feature_dim=12, hidden_dim=4),
                                                                  VideoGrid(3, 4, 5))],
    ids=["R3-fused", "R4-hidden"],
)
def test_variant_inference_matches_reference(small_blocks, config, grid):
    """`attend_kernel` under no_grad (linear keys read in place, the forward without the backward's statistics)
    against `attend_reference`."""
    processor = random_processor(HybridAttention, config, 2, 16).to(DEVICE)
    q, k, v = (torch.randn(2, grid.tokens, 2, 16, device=DEVICE) for _ in range(3))
    with torch.no_grad():
        out = processor.attend_kernel(q, k, v, grid)
    assert rel_err(out, processor.attend_reference(q, k, v, grid)) <= 1e-3


def test_rejects_bad_arguments():
    q = torch.randn(1, 32, 2, 16)
    with pytest.raises(ValueError, match="head_dim"):
        hybrid_attention(q[..., :12], q[..., :12], q[..., :12], None, None, 2)
    with pytest.raises(ValueError, match="go together"):
        hybrid_attention(q, q, q, torch.rand(1, 32, 2, 8), None, 2)
    with pytest.raises(ValueError, match="kv_summary"):
        hybrid_attention(q, q, q, torch.rand(1, 32, 2, 8), torch.rand(1, 2, 8, 16), 2)
    with pytest.raises(ValueError, match="rate"):
        hybrid_attention(q, q, q, None, None, 0)


@gpu
@needs_cuda
@pytest.mark.parametrize("tokens,rate,batch,heads,head_dim,dtype,layout", [
    (333, 5, 2, 3, 64, torch.bfloat16, "contiguous"),
    (20, 16, 2, 2, 128, torch.bfloat16, "contiguous"),
    (1000, 4, 1, 4, 128, torch.float16, "contiguous"),
    (700, 3, 2, 2, 128, torch.bfloat16, "fused-qkv"),
    (700, 1, 1, 2, 64, torch.bfloat16, "heads-first"),
], ids=["S333-R5-d64-batch2", "S20-R16-two-softmax-keys", "S1000-R4-fp16", "fused-qkv-views", "R1-heads-first-views"])
def test_gpu_cudnn_backward_shapes(poisoned_empty, tokens, rate, batch, heads, head_dim, dtype, layout):
    """cuDNN's backward path on shapes and layouts unlike Wan's: small and partial blocks, two softmax keys,
    fp16, q, k, v as views into one fused projection or transposed [B, H, S, D] tensors. (Not one softmax
    key: there dq and dk are exactly zero, and any half-precision path leaves rounding noise there.)"""
    g = torch.Generator().manual_seed(tokens + rate)
    q, k, v, phi_q, kv = random_inputs(batch, tokens, heads, head_dim, 16, rate, g, dtype, "cuda")
    if layout == "fused-qkv":
        q, k, v = torch.stack([q, k, v], 2).unbind(2)  # [B, S, 3, H, D] → strided views, as a fused to_qkv makes
    elif layout == "heads-first":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert hy.softmax_backward_for(q) is hy.cudnn_softmax_backward
    check_against_reference([q, k, v, phi_q, kv], rate, 2e-2)


@gpu
@needs_cuda
def test_gpu_fp32_head_dim_128(poisoned_empty):
    """fp32 rows of 128 (512 bytes, wider than one TMA swizzle span): forward and the Triton backward passes
    (cuDNN's takes no fp32), against the reference in fp64, ≤ 1e-3 (tf32 is off for fp32 inputs)."""
    g = torch.Generator().manual_seed(17)
    inputs = random_inputs(1, 333, 2, 128, 16, 3, g, torch.float32, "cuda")
    assert hy.softmax_backward_for(inputs[0]) is None
    check_against_reference(inputs, 3, 1e-3)

# ---- GPU: Wan-1.3B's shape in bf16 ----------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("rate", [4, 8])
@pytest.mark.parametrize("deterministic", [False, True], ids=["cudnn-backward", "deterministic-backward"])
def test_gpu_wan_shape_bf16(poisoned_empty, rate, deterministic):
    """21×30×52 = 32,760 tokens, 12 heads × 128, F = 128, bf16, through both backward paths. The fp32
    reference forms [S, S/R] score matrices, so it runs three heads at a time (heads are independent)."""
    g = torch.Generator().manual_seed(rate)
    inputs = random_inputs(1, VideoGrid(21, 30, 52).tokens, 12, 128, 128, rate, g, torch.bfloat16, "cuda")
    ours = [t.detach().requires_grad_() for t in inputs]
    with torch.no_grad():
        inference = hybrid_attention(*inputs, rate)  # the forward without the backward's statistics
    out = hybrid_attention(*ours, rate)
    grad = torch.randn_like(out)
    with deterministic_algorithms(deterministic):
        out.backward(grad)
    # Per head: q, k, v, φ_q are [B, S, H, ·] and KV is [B, H, ·, ·].
    split = [2, 2, 2, 2, 1]
    refs, ref_grads = [], [[] for _ in inputs]
    for h in range(0, 12, 3):
        part = [t.detach().narrow(d, h, 3).float().requires_grad_() for t, d in zip(inputs, split)]
        ref = hybrid_attention_reference(*part, rate)
        ref.backward(grad[:, :, h:h + 3].float())
        refs.append(ref.detach())
        for acc, t in zip(ref_grads, part):
            acc.append(t.grad)
    ref = torch.cat(refs, 2)
    errors = {"out": rel_err(out, ref), "inference out": rel_err(inference, ref)}
    for name, t, parts, d in zip(["dq", "dk", "dv", "dphi_q", "dkv"], ours, ref_grads, split):
        assert torch.isfinite(t.grad).all(), name
        errors[name] = rel_err(t.grad, torch.cat(parts, d))
    print(errors)
    assert torch.isfinite(out).all()
    assert all(e <= 2e-2 for e in errors.values()), errors
