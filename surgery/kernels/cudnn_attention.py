"""Plain softmax attention through cuDNN's fused SDPA kernels, for ops that hand it dense sub-problems.

torch's private ops `_scaled_dot_product_cudnn_attention` (forward, returning the log-sum-exp) and
`_scaled_dot_product_cudnn_attention_backward` (from a given o and lse) reach the fastest attention kernels on
Hopper (BENCHMARKS.md). The backward recomputes P = exp(scale·q·kᵀ − lse) from the lse it is given and takes
Δ = rowsum(do∘o) from the o it is given, so an op whose attention is split into pieces (the hybrid's softmax
branch, VMoBA's key blocks) gets exact gradients for each piece by handing it the *whole* attention's o and lse.

cuDNN accumulates dq atomically: its backward is not bit-repeatable, so `cudnn_attention_applies` turns it down
under `torch.use_deterministic_algorithms`. torch has reordered these private ops' arguments before: they are
used only where their schemas name the arguments passed here, in this order.
"""

from __future__ import annotations

import functools

import torch

# The argument orders the calls below pass; torch has had others (torch 2.11 and 2.13 have these).
FORWARD_ARGUMENTS = ("query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal",
                     "return_debug_mask", "scale")
BACKWARD_ARGUMENTS = ("grad_out", "query", "key", "value", "out", "logsumexp", "philox_seed", "philox_offset",
                      "attn_bias", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal", "scale")


def _arguments(name: str) -> tuple[str, ...] | None:
    op = getattr(torch.ops.aten, name, None)
    return None if op is None else tuple(a.name for a in op.default._schema.arguments)


@functools.cache
def cudnn_ops_available() -> bool:
    """Whether this torch has cuDNN's SDPA forward and backward ops with the arguments passed here."""
    return (_arguments("_scaled_dot_product_cudnn_attention") == FORWARD_ARGUMENTS
            and _arguments("_scaled_dot_product_cudnn_attention_backward") == BACKWARD_ARGUMENTS)


def cudnn_attention_applies(q: torch.Tensor, backward: bool) -> bool:
    """Whether cuDNN's attention takes q (and its backward, if `backward`): CUDA with sm ≥ 80, fp16/bf16, head dim
    ≤ 128 and a multiple of 8, cuDNN ≥ 9 with torch's cuDNN SDPA switched on; not the backward in deterministic
    mode."""
    return (
        q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0
        and not (backward and torch.are_deterministic_algorithms_enabled())
        and torch.backends.cuda.cudnn_sdp_enabled() and (torch.backends.cudnn.version() or 0) >= 90000
        and cudnn_ops_available() and torch.cuda.get_device_capability(q.device) >= (8, 0)
    )


def cudnn_attention_forward(q, k, v, scale):
    """o, lse of softmax(scale·q·kᵀ)·v. q: [B, H, S, D]; k, v: [B, H, S_kv, D] (any strides with unit last
    stride). Returns o [B, H, S, D] and lse [B, H, S] fp32 (natural log)."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
    o, lse = out[0], out[1]
    return o, lse.reshape(q.shape[:3])


def cudnn_attention_backward(do, q, k, v, o, lse, scale):
    """dq, dk, dv of o = softmax(scale·q·kᵀ)·v from do, o and lse [B, H, S] (natural log); layouts as
    `cudnn_attention_forward`. o enters only through Δ = rowsum(do∘o)."""
    no_dropout = torch.empty(0, device=q.device, dtype=torch.int64)
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        do, q, k, v, o, lse.unsqueeze(-1), no_dropout, no_dropout, None, None, None, q.shape[2], k.shape[2], 0.0,
        False, scale=scale)


def attention_forward_reference(q, k, v, scale):
    """`cudnn_attention_forward` in PyTorch (fp32; fp64 stays), for tests and as its definition."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bhsd,bhtd->bhst", q.to(dtype), k.to(dtype)) * scale
    lse = scores.logsumexp(-1)
    return torch.einsum("bhst,bhtd->bhsd", (scores - lse.unsqueeze(-1)).exp(), v.to(dtype)).to(q.dtype), lse


def attention_backward_reference(do, q, k, v, o, lse, scale):
    """`cudnn_attention_backward` in PyTorch: a flash-attention backward from the given o and lse (fp32; fp64
    stays)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    do, q, k, v, o = (t.to(dtype) for t in (do, q, k, v, o))
    p = (torch.einsum("bhsd,bhtd->bhst", q, k) * scale - lse.to(dtype).unsqueeze(-1)).exp()
    ds = p * (torch.einsum("bhsd,bhtd->bhst", do, v) - (do * o).sum(-1, keepdim=True))
    return (scale * torch.einsum("bhst,bhtd->bhsd", ds, k), scale * torch.einsum("bhst,bhsd->bhtd", ds, q),
            torch.einsum("bhst,bhsd->bhtd", p, do))
