"""Linear attention with one summary per tile, and each query tile reading its own mix of them: the linear term of
the `hybrid_selected` variant (`variants/hybrid_selected.py`) over the key tiles a query tile did not select.

Tokens come in tile order (`tile_order.to_tile_order`): tile t is tokens `offsets[t]:offsets[t + 1]`. Per batch
and head, with φ = softmax([xW + b, −(xW + b)]) over 2F features (`kernels/feature_map.py`) and U the [n, n]
query-tile × key-tile weights (1 − the 0/1 selection):

    S_j = Σ_{i∈j} φ_k(k_i)ᵀ v_i  [2F, D],   κ_j = Σ_{i∈j} φ_k(k_i)  [2F]          per key tile (`tile_summaries`)
    C_t = Σ_j U_tj S_j,   c_t = Σ_j U_tj κ_j                                       one batched matmul (torch)
    N_i = φ_q(q_i)·C_t  [D],   E_i = φ_q(q_i)·c_t   for the queries i of tile t    (`tile_apply`)

φ runs inside the kernels and is never written. The matmul with U is the one step that grows with n²: at Wan
1.3B's 624 tiles, 12 heads and 2F × D = 256 × 128 it is 0.3 TFLOP, on the tensor cores; doing it as a gather-sum
over each query tile's unselected tiles instead would read k·2F·D values per tile from memory.

Backward, with dN_i, dE_i given (the selected-hybrid op returns them): per query tile dφ_q(q_i) = C_t·dN_i + c_t·dE_i
→ dψ_q → dq, and dC_t = Σ_{i∈t} φ_q(q_i)ᵀ dN_i, dc_t = Σ_{i∈t} φ_q(q_i)·dE_i (the summary kernel over the queries,
weighted); torch takes dC, dc back through the matmul to dS, dκ; per key tile dv_i = φ_k(k_i)·dS_j and
dφ_k(k_i) = dS_j·v_i + dκ_j → dψ_k → dk. Each program owns one tile, so nothing is summed atomically
(deterministic). dW and db are torch reductions over the stored dψ, as in `kernels/linear_attention.py`, whose
per-row gradient math (`query_grads`, `key_grads`) these kernels share.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import input_precision
from .feature_map import parameter_grads, phi_tile
from .linear_attention import (apply_summary, key_grads, load_summary, query_grads, store_summary, summary_step,
                               zero_summary)

# Launch settings. The summary's two [F, BLOCK_D] fp32 accumulators at F = 128 fit at 8 warps, as in
# `linear_attention`'s summary kernel; the per-tile kernels take a whole tile (BLOCK_S ≥ its size) per program.
CONFIGS = {
    "summary": dict(BLOCK_S=32, BLOCK_D=128, num_warps=8),
    "apply": dict(num_warps=4),
    "bwd_query": dict(num_warps=4),
    "bwd_key": dict(num_warps=4),
}


@triton.jit
def _tile_program(x, weight, bias, summary, summary_sum, offsets, stride_xb, stride_xs, stride_xh, H, NT,
                  D: tl.constexpr, F: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr):
    """What the per-tile kernels share for their program's tile (axis 0, BLOCK_S ≥ its size) and batch·head
    (axis 1): the ids, the tile's token offsets and mask, ψ's weight [D, F], φ₊, φ₋ [BS, F] of x's rows, and the
    tile's summary halves [F, D] and sums [F] (C_t, c_t or dS_j, dκ_j)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    end = tl.load(offsets + i_t + 1)
    offs_s = tl.load(offsets + i_t) + tl.arange(0, BLOCK_S)
    s_ok = offs_s < end
    b_w, b_pos, b_neg = phi_tile(x, weight, bias, i_b, i_h, offs_s, s_ok, stride_xb, stride_xs, stride_xh,
                                 D, F, PRECISION)
    b_kv_pos, b_kv_neg, b_ks_pos, b_ks_neg = load_summary(summary, summary_sum, i_bh * NT + i_t, D, F)
    return i_b, i_h, i_bh, offs_s, s_ok, b_w, b_pos, b_neg, b_kv_pos, b_kv_neg, b_ks_pos, b_ks_neg


@triton.jit
def tile_summary_kernel(
    x, weight, bias, values, row_weights, summary, summary_sum, offsets,
    stride_xb, stride_xs, stride_xh, stride_vb, stride_vs, stride_vh,
    H, S, NT,
    D: tl.constexpr, F: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    WEIGHTED: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per (tile × column slice, batch·head): Σ_{i∈tile} φ(x_i)ᵀ values_i [2F, BLOCK_D] in the summary's dtype and
    Σ_{i∈tile} φ(x_i)·w_i [2F] in fp32, w_i = 1, or row_weights_i with WEIGHTED (the backward's dC, dc)."""
    i_td, i_bh = tl.program_id(0), tl.program_id(1)
    i_t, i_d = i_td // (D // BLOCK_D), i_td % (D // BLOCK_D)
    i_b, i_h = i_bh // H, i_bh % H
    start, end = tl.load(offsets + i_t), tl.load(offsets + i_t + 1)
    offs_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    v_base = values + i_b.to(tl.int64) * stride_vb + i_h * stride_vh
    acc_pos, acc_neg, sum_pos, sum_neg = zero_summary(F, BLOCK_D)
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < end
        _, b_pos, b_neg = phi_tile(x, weight, bias, i_b, i_h, offs_s, s_ok, stride_xb, stride_xs, stride_xh,
                                   D, F, PRECISION)
        # Rows past the tile load values 0 and get weight 0 (their φ is softmax(±b), not 0).
        b_v = tl.load(v_base + offs_s[:, None] * stride_vs + offs_d[None, :], mask=s_ok[:, None], other=0.)
        b_v = b_v.to(x.dtype.element_ty)  # [BS, BD]; the backward's dN may come in another dtype
        if WEIGHTED:
            b_w = tl.load(row_weights + i_bh.to(tl.int64) * S + offs_s, mask=s_ok, other=0.)  # [BS]
        else:
            b_w = s_ok.to(tl.float32)
        acc_pos, acc_neg, sum_pos, sum_neg = summary_step(b_pos, b_neg, b_v, b_w, acc_pos, acc_neg, sum_pos,
                                                          sum_neg, PRECISION)
    index = i_bh.to(tl.int64) * NT + i_t  # summaries are [B·H, n, 2F, ·]
    store_summary(summary, summary_sum, index, i_d, offs_d, acc_pos, acc_neg, sum_pos, sum_neg, D, F)


@triton.jit
def tile_apply_kernel(
    q, weight, bias, mix, mix_sum, num, den, offsets,
    stride_qb, stride_qs, stride_qh, stride_nb, stride_ns, stride_nh,
    H, S, NT,
    D: tl.constexpr, F: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per (query tile, batch·head): N = φ_q·C_t [BS, D] in num's dtype and E = φ_q·c_t [BS] in fp32."""
    i_b, i_h, i_bh, offs_s, s_ok, _, b_pos, b_neg, b_c_pos, b_c_neg, b_cs_pos, b_cs_neg = _tile_program(
        q, weight, bias, mix, mix_sum, offsets, stride_qb, stride_qs, stride_qh, H, NT, D, F, BLOCK_S, PRECISION)
    b_n, b_e = apply_summary(b_pos, b_neg, b_c_pos, b_c_neg, b_cs_pos, b_cs_neg, PRECISION)  # [BS, D], [BS]
    offs_d = tl.arange(0, D)
    tl.store(num + i_b.to(tl.int64) * stride_nb + i_h * stride_nh + offs_s[:, None] * stride_ns + offs_d[None, :],
             b_n.to(num.dtype.element_ty), mask=s_ok[:, None])
    tl.store(den + i_bh.to(tl.int64) * S + offs_s, b_e, mask=s_ok)


@triton.jit
def tile_apply_bwd_kernel(
    q, weight, bias, mix, mix_sum, dnum, dden, dq, dpsi, offsets,
    stride_qb, stride_qs, stride_qh, stride_gb, stride_gs, stride_gh,
    stride_dqb, stride_dqs, stride_dqh, stride_pb, stride_ps, stride_ph,
    H, S, NT,
    D: tl.constexpr, F: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per (query tile, batch·head): dq and dψ_q from dN, dE through C_t and c_t."""
    i_b, i_h, i_bh, offs_s, s_ok, b_w, b_pos, b_neg, b_c_pos, b_c_neg, b_cs_pos, b_cs_neg = _tile_program(
        q, weight, bias, mix, mix_sum, offsets, stride_qb, stride_qs, stride_qh, H, NT, D, F, BLOCK_S, PRECISION)
    offs_d, offs_f = tl.arange(0, D), tl.arange(0, F)
    # Rows past the tile load dN = 0 and dE = 0, so their dψ is exactly 0.
    b_dn = tl.load(dnum + i_b.to(tl.int64) * stride_gb + i_h * stride_gh + offs_s[:, None] * stride_gs
                   + offs_d[None, :], mask=s_ok[:, None], other=0.).to(b_c_pos.dtype)  # [BS, D]
    b_de = tl.load(dden + i_bh.to(tl.int64) * S + offs_s, mask=s_ok, other=0.)  # [BS]
    b_dpsi, b_dq = query_grads(b_pos, b_neg, b_w, b_dn, b_de, b_c_pos, b_c_neg, b_cs_pos, b_cs_neg, dpsi,
                               PRECISION)
    tl.store(dq + i_b.to(tl.int64) * stride_dqb + i_h * stride_dqh + offs_s[:, None] * stride_dqs + offs_d[None, :],
             b_dq.to(dq.dtype.element_ty), mask=s_ok[:, None])
    tl.store(dpsi + i_b.to(tl.int64) * stride_pb + i_h * stride_ph + offs_s[:, None] * stride_ps + offs_f[None, :],
             b_dpsi, mask=s_ok[:, None])


@triton.jit
def tile_summary_bwd_kernel(
    k, weight, bias, v, dsummary, dsummary_sum, dk, dv, dpsi, offsets,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh, stride_pb, stride_ps, stride_ph,
    H, NT,
    D: tl.constexpr, F: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per (key tile, batch·head): dk, dv and dψ_k from the tile's dS_j, dκ_j."""
    i_b, i_h, i_bh, offs_s, s_ok, b_w, b_pos, b_neg, b_ds_pos, b_ds_neg, b_dss_pos, b_dss_neg = _tile_program(
        k, weight, bias, dsummary, dsummary_sum, offsets, stride_kb, stride_ks, stride_kh, H, NT, D, F, BLOCK_S,
        PRECISION)
    offs_d, offs_f = tl.arange(0, D), tl.arange(0, F)
    b_v = tl.load(v + i_b.to(tl.int64) * stride_vb + i_h * stride_vh + offs_s[:, None] * stride_vs + offs_d[None, :],
                  mask=s_ok[:, None], other=0.)  # [BS, D]
    b_dv, b_dpsi, b_dk = key_grads(b_pos, b_neg, b_w, b_v, b_ds_pos, b_ds_neg, b_dss_pos, b_dss_neg,
                                   s_ok.to(tl.float32)[:, None], dpsi, PRECISION)
    tl.store(dk + i_b.to(tl.int64) * stride_dkb + i_h * stride_dkh + offs_s[:, None] * stride_dks + offs_d[None, :],
             b_dk.to(dk.dtype.element_ty), mask=s_ok[:, None])
    tl.store(dv + i_b.to(tl.int64) * stride_dvb + i_h * stride_dvh + offs_s[:, None] * stride_dvs + offs_d[None, :],
             b_dv.to(dv.dtype.element_ty), mask=s_ok[:, None])
    tl.store(dpsi + i_b.to(tl.int64) * stride_pb + i_h * stride_ph + offs_s[:, None] * stride_ps + offs_f[None, :],
             b_dpsi, mask=s_ok[:, None])


def _tile_block(max_tile: int) -> int:
    return max(16, triton.next_power_of_2(max_tile))


def summaries(x, weight, bias, values, offsets, row_weights=None):
    """Per tile Σφ(x)ᵀ values [B·H, n, 2F, D] in x's dtype and Σφ(x)·w [B·H, n, 2F] in fp32 (w = row_weights
    [B, H, S] fp32, or 1)."""
    B, S, H, D = x.shape
    F, tiles = weight.shape[-1], offsets.numel() - 1
    config = {**CONFIGS["summary"], "BLOCK_D": min(CONFIGS["summary"]["BLOCK_D"], D)}
    summary = torch.empty(B * H, tiles, 2 * F, D, device=x.device, dtype=x.dtype)
    summary_sum = torch.empty(B * H, tiles, 2 * F, device=x.device, dtype=torch.float32)
    weighted = row_weights is not None
    tile_summary_kernel[(tiles * (D // config["BLOCK_D"]), B * H)](
        x, weight, bias, values, row_weights if weighted else x, summary, summary_sum, offsets,
        x.stride(0), x.stride(1), x.stride(2), values.stride(0), values.stride(1), values.stride(2),
        H, S, tiles,
        D=D, F=F, WEIGHTED=weighted, PRECISION=input_precision(x.dtype), **config,
    )
    return summary, summary_sum


class TileSummaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, weight, bias, offsets, max_tile):
        ctx.save_for_backward(k, v, weight, bias, offsets)
        ctx.max_tile = max_tile
        return summaries(k, weight, bias, v, offsets)

    @staticmethod
    def backward(ctx, dsummary, dsummary_sum):
        k, v, weight, bias, offsets = ctx.saved_tensors
        B, L, H, D = k.shape
        tiles = offsets.numel() - 1
        # autograd materialises an unused output's gradient as zeros: neither comes as None.
        dsummary, dsummary_sum = dsummary.to(k.dtype).contiguous(), dsummary_sum.float().contiguous()
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dpsi = torch.empty(B, L, H, weight.shape[-1], device=k.device, dtype=k.dtype)
        tile_summary_bwd_kernel[(tiles, B * H)](
            k, weight, bias, v, dsummary, dsummary_sum, dk, dv, dpsi, offsets,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            dpsi.stride(0), dpsi.stride(1), dpsi.stride(2),
            H, tiles,
            D=D, F=weight.shape[-1], BLOCK_S=_tile_block(ctx.max_tile), PRECISION=input_precision(k.dtype),
            **CONFIGS["bwd_key"],
        )
        return dk, dv, *parameter_grads(k, dpsi, bias, *ctx.needs_input_grad[2:4]), None, None


class TileApplyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, weight, bias, mix, mix_sum, offsets, max_tile):
        B, S, H, D = q.shape
        num = torch.empty_like(q)
        den = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
        tile_apply_kernel[(offsets.numel() - 1, B * H)](
            q, weight, bias, mix, mix_sum, num, den, offsets,
            q.stride(0), q.stride(1), q.stride(2), num.stride(0), num.stride(1), num.stride(2),
            H, S, offsets.numel() - 1,
            D=D, F=weight.shape[-1], BLOCK_S=_tile_block(max_tile), PRECISION=input_precision(q.dtype),
            **CONFIGS["apply"],
        )
        ctx.save_for_backward(q, weight, bias, mix, mix_sum, offsets)
        ctx.max_tile = max_tile
        return num, den

    @staticmethod
    def backward(ctx, dnum, dden):
        q, weight, bias, mix, mix_sum, offsets = ctx.saved_tensors
        B, S, H, D = q.shape
        dnum = dnum if dnum.stride(-1) == 1 else dnum.contiguous()
        dden = dden.float().contiguous()
        dq = torch.empty_like(q)
        dpsi = torch.empty(B, S, H, weight.shape[-1], device=q.device, dtype=q.dtype)
        tile_apply_bwd_kernel[(offsets.numel() - 1, B * H)](
            q, weight, bias, mix, mix_sum, dnum, dden, dq, dpsi, offsets,
            q.stride(0), q.stride(1), q.stride(2), dnum.stride(0), dnum.stride(1), dnum.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), dpsi.stride(0), dpsi.stride(1), dpsi.stride(2),
            H, S, offsets.numel() - 1,
            D=D, F=weight.shape[-1], BLOCK_S=_tile_block(ctx.max_tile), PRECISION=input_precision(q.dtype),
            **CONFIGS["bwd_query"],
        )
        dmix, dmix_sum = summaries(q, weight, bias, dnum, offsets, dden)
        return dq, *parameter_grads(q, dpsi, bias, *ctx.needs_input_grad[1:3]), dmix, dmix_sum, None, None


def tile_mixed_linear_terms(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight_q: torch.Tensor,
    bias_q: torch.Tensor,
    weight_k: torch.Tensor,
    bias_k: torch.Tensor,
    tile_weights: torch.Tensor,
    offsets: torch.Tensor,
    max_tile: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """N_i = φ_q(q_i)·Σ_j U_tj S_j and E_i = φ_q(q_i)·Σ_j U_tj κ_j for each query i of tile t (Triton, CUDA or
    interpreter); see the module docstring.

    Args:
        q, k, v: [B, S, H, D] in tile order; fp16, bf16 or fp32; D a power of two ≥ 16; contiguous last dim.
        weight_q, bias_q, weight_k, bias_k: φ_q's and φ_k's parameters ([H, D, F], F a power of two ≥ 16, and
            [H, F]) in q's dtype (`FeatureMap` with hidden_dim = 0).
        tile_weights: [B, H, n, n] U, query tile × key tile (for `hybrid_selected`: 1 − the selection), any dtype.
        offsets: [n + 1] the tiles' token offsets (int); max_tile: an upper bound on every tile's size.

    Returns:
        N [B, S, H, D] in q's dtype and E [B, H, S] in fp32; differentiable in q, k, v and the four parameters.
    """
    B, S, H, D = q.shape
    tiles = offsets.numel() - 1
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"k and v must be [B, S, H, D] like q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}")
    if tile_weights.shape != (B, H, tiles, tiles):
        raise ValueError(f"tile_weights must be [B, H, n, n] = {(B, H, tiles, tiles)}, "
                         f"got {tuple(tile_weights.shape)}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    weight_q, bias_q, weight_k, bias_k = (t.contiguous() for t in (weight_q, bias_q, weight_k, bias_k))
    summary, summary_sum = TileSummaryFunction.apply(k, v, weight_k, bias_k, offsets, max_tile)
    weights = tile_weights.flatten(0, 1)  # [B·H, n, n]
    # The summaries stay in q's dtype for the tensor cores (fp32 sums inside the matmul); κ's mix runs in fp32.
    mix = torch.bmm(weights.to(summary.dtype), summary.flatten(2)).view_as(summary)
    mix_sum = torch.bmm(weights.float(), summary_sum)
    return TileApplyFunction.apply(q, weight_q, bias_q, mix, mix_sum, offsets, max_tile)


__all__ = ["tile_mixed_linear_terms"]
