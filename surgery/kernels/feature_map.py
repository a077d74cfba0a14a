"""Hedgehog feature map φ(x) = softmax([ψ, −ψ]), ψ = x·W + b, in one pass each way (the `linear` and
`hybrid` variants' φ_q and φ_k with hidden_dim = 0; `variants/feature_maps.py` holds the reference).

Per head h, with W[h]: [D, F] and b[h]: [F], over the 2F features of each token:

    φ₊ = exp(ψ − m) / z,   φ₋ = exp(−ψ − m) / z,   m = max|ψ|,   z = Σ exp(ψ − m) + Σ exp(−ψ − m).

Forward: one program per (token block, batch·head) loads x [BLOCK_S, D] and W[h], computes ψ with tl.dot
(fp32 accumulation) and writes φ [BLOCK_S, 2F] in x's dtype: x is read once and φ written once, where
PyTorch makes a pass each for the bias add, the negation, the concatenation and the softmax.

Backward, with s = Σ_f φ_f·dφ_f over all 2F features (the softmax Jacobian):

    dψ = φ₊ (dφ₊ − s) − φ₋ (dφ₋ − s),   dx = dψ·Wᵀ,   dW = Σ_tokens xᵀ dψ,   db = Σ_tokens dψ.

It saves only x (and the parameters) and recomputes ψ and φ from it. Memory: φ is twice x's size at
F = D (2F values a token against D), so keeping it for the backward would cost twice the activation memory
per map per layer (the reference keeps x for its matmul and φ for its softmax). Time: reading φ back moves
twice the bytes of re-reading x, and the recompute costs one [BLOCK_S, D]×[D, F] product and 2F
exponentials a token, far below what this memory-bound pass leaves idle. The kernel writes dx and dψ; dW
is one batched matmul over the tokens in torch (deterministic, fp32 accumulation inside), as
`kernels/hybrid.py` does for dKV, and db a sum of dψ.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .common import LOG2E, input_precision

# Launch settings: the fastest of `bench/hybrid.py --sweep` at head_dim 128, F = 128 on an H100 (fwd 0.138 ms;
# bwd 0.602 ms fwd+bwd, against 0.620–0.659 at 64 tokens; bench/NOTES.md, "Launch settings"). The tests shrink
# the blocks.
CONFIGS = {
    "fwd": dict(BLOCK_S=64, num_warps=8),
    "bwd": dict(BLOCK_S=128, num_warps=8),
}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def phi_tile(x, weight, bias, i_b, i_h, offs_s, s_ok, stride_xb, stride_xs, stride_xh,
             D: tl.constexpr, F: tl.constexpr, PRECISION: tl.constexpr):
    """For the tokens offs_s of batch i_b, head i_h (rows where s_ok is false read x = 0): W[h] [D, F] and
    φ₊, φ₋ [BS, F] in fp32. Shared with `kernels/linear_attention.py`, which runs φ inside its own loops."""
    offs_d, offs_f = tl.arange(0, D), tl.arange(0, F)
    b_x = tl.load(x + i_b.to(tl.int64) * stride_xb + i_h * stride_xh + offs_s[:, None] * stride_xs + offs_d[None, :],
                  mask=s_ok[:, None], other=0.)  # [BS, D]
    b_w = tl.load(weight + i_h * D * F + offs_d[:, None] * F + offs_f[None, :])  # [D, F]
    b_b = tl.load(bias + i_h * F + offs_f).to(tl.float32)  # [F]
    b_psi = (tl.dot(b_x, b_w, input_precision=PRECISION) + b_b[None, :]) * LOG2E  # [BS, F], log2 units
    # The max over [ψ, −ψ] is max|ψ|, so both halves share it and every exponent is ≤ 0.
    b_m = tl.max(tl.abs(b_psi), 1)
    b_pos = tl.exp2(b_psi - b_m[:, None])
    b_neg = tl.exp2(-b_psi - b_m[:, None])
    b_z = tl.sum(b_pos, 1) + tl.sum(b_neg, 1)
    return b_w, b_pos / b_z[:, None], b_neg / b_z[:, None]


@triton.jit
def block_phi(x, weight, bias, stride_xb, stride_xs, stride_xh, H, S,
              D: tl.constexpr, F: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr):
    """`phi_tile` for the token block of a (token block, batch·head) program: also returns the program's
    batch, head, token offsets and their mask."""
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    offs_s = i_s * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    b_w, b_pos, b_neg = phi_tile(x, weight, bias, i_b, i_h, offs_s, s_ok, stride_xb, stride_xs, stride_xh,
                                 D, F, PRECISION)
    return i_b, i_h, offs_s, s_ok, b_w, b_pos, b_neg


@triton.jit
def softmax_jacobian(b_pos, b_neg, b_dpos, b_dneg):
    """dψ [BS, F] from φ₊, φ₋ and the gradients dφ₊, dφ₋ (all [BS, F], fp32): the backward of the softmax
    over [ψ, −ψ], with s = Σ_f φ_f·dφ_f over all 2F features."""
    b_s = tl.sum(b_pos * b_dpos, 1) + tl.sum(b_neg * b_dneg, 1)  # [BS]
    return b_pos * (b_dpos - b_s[:, None]) - b_neg * (b_dneg - b_s[:, None])


@triton.jit
def feature_map_fwd_kernel(
    x, weight, bias, phi,
    stride_xb, stride_xs, stride_xh, stride_pb, stride_ps, stride_ph,
    H, S,
    D: tl.constexpr, F: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr,
):
    i_b, i_h, offs_s, s_ok, _, b_pos, b_neg = block_phi(x, weight, bias, stride_xb, stride_xs, stride_xh, H, S,
                                                        D, F, BLOCK_S, PRECISION)
    p_off = i_b.to(tl.int64) * stride_pb + i_h * stride_ph + offs_s[:, None] * stride_ps + tl.arange(0, F)[None, :]
    tl.store(phi + p_off, b_pos.to(phi.dtype.element_ty), mask=s_ok[:, None])
    tl.store(phi + p_off + F, b_neg.to(phi.dtype.element_ty), mask=s_ok[:, None])


@triton.jit
def feature_map_bwd_kernel(
    x, weight, bias, dphi, dx, dpsi,
    stride_xb, stride_xs, stride_xh, stride_gb, stride_gs, stride_gh,
    stride_dxb, stride_dxs, stride_dxh, stride_dpb, stride_dps, stride_dph,
    H, S,
    D: tl.constexpr, F: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr,
):
    i_b, i_h, offs_s, s_ok, b_w, b_pos, b_neg = block_phi(x, weight, bias, stride_xb, stride_xs, stride_xh, H, S,
                                                          D, F, BLOCK_S, PRECISION)
    offs_d, offs_f = tl.arange(0, D), tl.arange(0, F)
    g_off = i_b.to(tl.int64) * stride_gb + i_h * stride_gh + offs_s[:, None] * stride_gs + offs_f[None, :]
    # Rows past S load dφ = 0, so their dψ is exactly 0.
    b_dpos = tl.load(dphi + g_off, mask=s_ok[:, None], other=0.).to(tl.float32)  # [BS, F]
    b_dneg = tl.load(dphi + g_off + F, mask=s_ok[:, None], other=0.).to(tl.float32)  # [BS, F]
    # Rounded to x's dtype once: the dx product's operand and what dW is summed from.
    b_dpsi = softmax_jacobian(b_pos, b_neg, b_dpos, b_dneg).to(dpsi.dtype.element_ty)  # [BS, F]
    b_dx = tl.dot(b_dpsi, tl.trans(b_w), input_precision=PRECISION)  # [BS, D]
    tl.store(dx + i_b.to(tl.int64) * stride_dxb + i_h * stride_dxh + offs_s[:, None] * stride_dxs + offs_d[None, :],
             b_dx.to(dx.dtype.element_ty), mask=s_ok[:, None])
    tl.store(dpsi + i_b.to(tl.int64) * stride_dpb + i_h * stride_dph + offs_s[:, None] * stride_dps + offs_f[None, :],
             b_dpsi, mask=s_ok[:, None])


def feature_map_fwd(x, weight, bias):
    B, S, H, D = x.shape
    F = weight.shape[-1]
    config = CONFIGS["fwd"]
    phi = torch.empty(B, S, H, 2 * F, device=x.device, dtype=x.dtype)
    feature_map_fwd_kernel[(triton.cdiv(S, config["BLOCK_S"]), B * H)](
        x, weight, bias, phi,
        x.stride(0), x.stride(1), x.stride(2), phi.stride(0), phi.stride(1), phi.stride(2),
        H, S,
        D=D, F=F, PRECISION=input_precision(x.dtype), **config,
    )
    return phi


def feature_map_bwd(dphi, x, weight, bias):
    B, S, H, D = x.shape
    F = weight.shape[-1]
    config = CONFIGS["bwd"]
    dx = torch.empty_like(x)
    dpsi = torch.empty(B, S, H, F, device=x.device, dtype=x.dtype)
    feature_map_bwd_kernel[(triton.cdiv(S, config["BLOCK_S"]), B * H)](
        x, weight, bias, dphi, dx, dpsi,
        x.stride(0), x.stride(1), x.stride(2), dphi.stride(0), dphi.stride(1), dphi.stride(2),
        dx.stride(0), dx.stride(1), dx.stride(2), dpsi.stride(0), dpsi.stride(1), dpsi.stride(2),
        H, S,
        D=D, F=F, PRECISION=input_precision(x.dtype), **config,
    )
    return dx, dpsi


class FeatureMapFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return feature_map_fwd(x, weight, bias)

    @staticmethod
    def backward(ctx, dphi):
        x, weight, bias = ctx.saved_tensors
        dx, dpsi = feature_map_bwd(dphi if dphi.stride(-1) == 1 else dphi.contiguous(), x, weight, bias)
        return dx, *parameter_grads(x, dpsi, bias, *ctx.needs_input_grad[1:3])


def parameter_grads(x, dpsi, bias, needs_weight: bool, needs_bias: bool):
    """dW = Σ_tokens xᵀ dψ [H, D, F] (one batched matmul, fp32 accumulation inside: deterministic) and
    db = Σ_tokens dψ [H, F] for x [B, S, H, D] and dψ [B, S, H, F]; None where not needed."""
    dweight = torch.einsum("bshd,bshf->hdf", x, dpsi) if needs_weight else None
    dbias = dpsi.sum(dim=(0, 1), dtype=torch.float32).to(bias.dtype) if needs_bias else None
    return dweight, dbias


def unsupported_reason(x: torch.Tensor, weight: torch.Tensor, kernel=None) -> str | None:
    """Why `feature_map` cannot run on x [B, S, H, D] with weight [H, D, F], or None when it can. `kernel`: the
    jit function whose mode (compiled or interpreted) decides where it runs, by default this module's forward;
    `kernels/linear_attention.py` passes its own."""
    if x.dtype not in DTYPES:
        return f"it takes fp16, bf16 or fp32, got {x.dtype}"
    # tl.arange needs powers of two, tl.dot sizes of at least 16.
    for name, size in (("head_dim", x.shape[-1]), ("feature_dim", weight.shape[-1])):
        if size < 16 or size & (size - 1):
            return f"{name} must be a power of two ≥ 16, got {size}"
    # triton.jit picks the interpreter once, when triton is imported with TRITON_INTERPRET=1.
    if not x.is_cuda and not isinstance(kernel or feature_map_fwd_kernel, InterpretedFunction):
        return f"tensors on {x.device} need CUDA or Triton's interpreter (TRITON_INTERPRET=1)"
    return None


def feature_map(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """φ(x) = softmax([x·W + b, −(x·W + b)]) per head (Triton, CUDA or interpreter); see the module docstring.

    Args:
        x: [B, S, H, D]; fp16, bf16 or fp32; D a power of two ≥ 16; any strides with a contiguous last dim.
        weight: [H, D, F], F a power of two ≥ 16, and bias: [H, F], both in x's dtype.

    Returns:
        φ(x): [B, S, H, 2F] in x's dtype, contiguous. Differentiable in x, weight and bias.
    """
    B, S, H, D = x.shape
    if weight.shape[:2] != (H, D) or bias.shape != (H, weight.shape[-1]):
        raise ValueError(f"weight must be [H, D, F] and bias [H, F] for x {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}, {tuple(bias.shape)}")
    if weight.dtype != x.dtype or bias.dtype != x.dtype:
        raise ValueError(f"weight and bias must be in x's dtype {x.dtype}, got {weight.dtype}, {bias.dtype}")
    reason = unsupported_reason(x, weight)
    if reason:
        raise ValueError(f"feature_map kernel: {reason}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    return FeatureMapFunction.apply(x, weight.contiguous(), bias.contiguous())


__all__ = ["feature_map", "unsupported_reason"]
