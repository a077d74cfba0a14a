"""Non-causal linear attention with the Hedgehog feature maps fused in, forward and backward (the `linear`
variant's CUDA path; its reference is `LinearAttention.attend_reference`). φ_q(q) and φ_k(k) are computed
inside the kernels from q and k and never written to memory.

Per batch and head, with φ = softmax([xW + b, −(xW + b)]) over 2F features (`kernels/feature_map.py`; φ₊, φ₋
its two halves) and L keys, the summary is kept as means over the keys, which cancel in the ratio but keep
every value O(|v|) at any L (a sum over 32k keys can overflow fp16 from |v| ≈ 2):

    KV = (1/L) Σ_j φ_k(k_j)ᵀ v_j  [2F, D],   κ = (1/L) Σ_j φ_k(k_j)  [2F],
    n_i = φ_q(q_i)·KV  [D],   z_i = φ_q(q_i)·κ,   o_i = n_i / z_i.

Forward: (1) the summary kernel, one program per (chunk of CHUNK_S keys × BLOCK_D value columns, batch·head),
recomputes φ_k block by block and accumulates φ₊ᵀv, φ₋ᵀv, Σφ₊ and Σφ₋ in fp32 into that chunk's partial; torch
sums the partials over chunks (deterministic) and divides by L. Chunks, not one program per head, because
B·H = 12 programs would leave most of the GPU idle. (2) The application kernel, one program per (query block,
batch·head): φ_q, n = φ_q·KV, z = φ_q·κ, o = n / z in q's dtype; it also stores z ([B, H, S], fp32).

Backward, with do_i = ∂loss/∂o_i:

    dn_i = do_i / z_i,   dz_i = −do_i·n_i / z_i² = −(do_i·o_i) / z_i
    dφ_q(q_i) = KV·dn_i + κ dz_i                                           [2F]
    dKV = Σ_i φ_q(q_i)ᵀ dn_i,   dκ = Σ_i φ_q(q_i) dz_i
    dφ_k(k_j) = (dKV·v_j + dκ) / L,   dv_j = φ_k(k_j)·dKV / L

and through each map's softmax, with s = φ·dφ over the 2F features (`softmax_jacobian`):
dψ = φ₊(dφ₊ − s) − φ₋(dφ₋ − s), dx = dψ·Wᵀ, dW = Σ_tokens xᵀdψ, db = Σ_tokens dψ. On the query side s is 0 in
exact arithmetic (φ_q·dφ_q = n_i·do_i/z_i − do_i·o_i): o_i does not change when φ_q(q_i) is scaled.

Three passes, each recomputing φ from q or k: (a) per query block: φ_q, n (recomputed in fp32 rather than
read back as the rounded o), dφ_q → dψ_q → dq, storing dψ_q and dz; (b) the summary kernel over the queries
with values do/z and key-sum weights dz: dKV and dκ; (c) per key block: φ_k, dv and dφ_k → dψ_k → dk.
The backward reads only q, k, v, do, the parameters, KV, κ and z: beyond its inputs the op saves KV
([B, H, 2F, D] in q's dtype), κ ([B, H, 2F]) and z ([B, H, S], fp32), where the torch path kept φ_q, φ_k and
their [B, S, H, D+1] products. dW and db are torch reductions over the dψ the passes store (see
`LinearAttentionFunction.backward`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import feature_map as fm
from .common import input_precision
from .feature_map import block_phi, parameter_grads, phi_tile, softmax_jacobian

# Launch settings: the fastest of `bench/hybrid.py --sweep` at head_dim 128, F = 128 on an H100 (bench/NOTES.md,
# "Launch settings"; the summary's two [F, 128] fp32 accumulators fit at 8 warps with 32-key steps). CHUNK_S
# gives 32 chunks × 12 heads = 384 summary programs at Wan-1.3B's 32,760 tokens. The tests shrink the blocks.
CONFIGS = {
    "summary": dict(BLOCK_S=32, BLOCK_D=128, CHUNK_S=1024, num_warps=8),
    "fwd": dict(BLOCK_S=64, num_warps=4),
    "bwd_query": dict(BLOCK_S=64, num_warps=4),
    "bwd_key": dict(BLOCK_S=32, num_warps=4),
}


@triton.jit
def _kept(offs_s, end, SKIP, HAS_SKIP: tl.constexpr):
    """Which of the tokens offs_s count: those below end, and with HAS_SKIP not at a multiple of SKIP."""
    if HAS_SKIP:
        return (offs_s < end) & (offs_s % SKIP != 0)
    return offs_s < end


@triton.jit
def linear_attention_summary_kernel(
    x, weight, bias, values, den, dden, partial_kv, partial_sum,
    stride_xb, stride_xs, stride_xh, stride_vb, stride_vs, stride_vh,
    H, S, SKIP, CHUNK_S,
    D: tl.constexpr, F: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    WEIGHTED: tl.constexpr, HAS_SKIP: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per (chunk × column slice, batch·head): Σ_j φ(x_j)ᵀ values_j [2F, BLOCK_D] and Σ_j φ(x_j) [2F] over the
    chunk's tokens, fp32. WEIGHTED (the backward's dKV, dκ): values_j / den_j and Σ_j φ(x_j)·dden_j.
    HAS_SKIP: tokens j at multiples of SKIP are left out (the hybrid's softmax keys)."""
    i_cd, i_bh = tl.program_id(0), tl.program_id(1)
    i_c, i_d = i_cd // (D // BLOCK_D), i_cd % (D // BLOCK_D)
    i_b, i_h = i_bh // H, i_bh % H
    chunk_start = i_c * CHUNK_S
    chunk_end = tl.minimum(chunk_start + CHUNK_S, S)
    offs_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    v_base = values + i_b.to(tl.int64) * stride_vb + i_h * stride_vh
    acc_pos, acc_neg, sum_pos, sum_neg = zero_summary(F, BLOCK_D)
    for s0 in range(chunk_start, chunk_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = _kept(offs_s, chunk_end, SKIP, HAS_SKIP)
        _, b_pos, b_neg = phi_tile(x, weight, bias, i_b, i_h, offs_s, s_ok, stride_xb, stride_xs, stride_xh,
                                   D, F, PRECISION)
        # Rows past the chunk load v = 0 and get weight 0 (their φ is softmax(±b), not 0).
        b_v = tl.load(v_base + offs_s[:, None] * stride_vs + offs_d[None, :], mask=s_ok[:, None], other=0.)  # [BS, BD]
        if WEIGHTED:
            row = i_bh.to(tl.int64) * S + offs_s
            b_den = tl.load(den + row, mask=s_ok, other=1.)
            b_v = (b_v.to(tl.float32) / b_den[:, None]).to(values.dtype.element_ty)
            b_weight = tl.load(dden + row, mask=s_ok, other=0.)  # [BS]
        else:
            b_weight = s_ok.to(tl.float32)
        acc_pos, acc_neg, sum_pos, sum_neg = summary_step(b_pos, b_neg, b_v, b_weight, acc_pos, acc_neg, sum_pos,
                                                          sum_neg, PRECISION)
    partial = i_c.to(tl.int64) * tl.num_programs(1) + i_bh  # partials are [chunks, B·H, 2F, ·]
    store_summary(partial_kv, partial_sum, partial, i_d, offs_d, acc_pos, acc_neg, sum_pos, sum_neg, D, F)


@triton.jit
def zero_summary(F: tl.constexpr, BLOCK_D: tl.constexpr):
    """Empty fp32 accumulators for `summary_step`: φ₊ᵀv, φ₋ᵀv [F, BLOCK_D] and Σφ₊·w, Σφ₋·w [F]."""
    return (tl.zeros([F, BLOCK_D], tl.float32), tl.zeros([F, BLOCK_D], tl.float32), tl.zeros([F], tl.float32),
            tl.zeros([F], tl.float32))


@triton.jit
def summary_step(b_pos, b_neg, b_v, b_weight, acc_pos, acc_neg, sum_pos, sum_neg, PRECISION: tl.constexpr):
    """One block of rows into a summary: φ₊ᵀv, φ₋ᵀv into the [F, BD] accumulators and Σφ₊·w, Σφ₋·w into the [F]
    ones, from φ₊, φ₋ [BS, F] (fp32), values [BS, BD] and row weights w [BS] (fp32)."""
    acc_pos += tl.dot(tl.trans(b_pos.to(b_v.dtype)), b_v, input_precision=PRECISION)
    acc_neg += tl.dot(tl.trans(b_neg.to(b_v.dtype)), b_v, input_precision=PRECISION)
    sum_pos += tl.sum(b_pos * b_weight[:, None], 0)
    sum_neg += tl.sum(b_neg * b_weight[:, None], 0)
    return acc_pos, acc_neg, sum_pos, sum_neg


@triton.jit
def store_summary(kv, ksum, index, i_d, offs_d, acc_pos, acc_neg, sum_pos, sum_neg, D: tl.constexpr,
                  F: tl.constexpr):
    """A summary's column slice offs_d into row `index` of kv [·, 2F, D] (in its dtype), and its [2F] sums into
    ksum [·, 2F] from the first slice's program (i_d = 0): φ₊'s rows first, then φ₋'s."""
    offs_f = tl.arange(0, F)
    kv_base = kv + index * 2 * F * D
    tl.store(kv_base + offs_f[:, None] * D + offs_d[None, :], acc_pos.to(kv.dtype.element_ty))
    tl.store(kv_base + (F + offs_f[:, None]) * D + offs_d[None, :], acc_neg.to(kv.dtype.element_ty))
    if i_d == 0:
        tl.store(ksum + index * 2 * F + offs_f, sum_pos)
        tl.store(ksum + index * 2 * F + F + offs_f, sum_neg)


@triton.jit
def load_summary(kv, ksum, i_bh, D: tl.constexpr, F: tl.constexpr):
    """Entry i_bh of a stack of [2F, D] matrices (one per head here, per tile and head in `tile_linear`) split into
    its φ₊ and φ₋ rows ([F, D] each, as stored), and of the [2F] fp32 vectors beside them likewise ([F] each): KV
    and κ in the forward, dKV and dκ in the backward."""
    offs_d, offs_f = tl.arange(0, D), tl.arange(0, F)
    kv_base = kv + i_bh.to(tl.int64) * 2 * F * D
    sum_base = ksum + i_bh.to(tl.int64) * 2 * F
    b_kv_pos = tl.load(kv_base + offs_f[:, None] * D + offs_d[None, :])
    b_kv_neg = tl.load(kv_base + (F + offs_f[:, None]) * D + offs_d[None, :])
    return b_kv_pos, b_kv_neg, tl.load(sum_base + offs_f), tl.load(sum_base + F + offs_f)


@triton.jit
def _times_summary(b_pos, b_neg, b_kv_pos, b_kv_neg, PRECISION: tl.constexpr):
    """φ·KV [BS, D] in fp32 from φ₊, φ₋ [BS, F] (fp32, rounded to KV's dtype for the tensor cores) and KV's two
    halves [F, D]: n in the forward and the query pass, φ_k·dKV in the key pass."""
    b_out = tl.dot(b_pos.to(b_kv_pos.dtype), b_kv_pos, input_precision=PRECISION)
    return b_out + tl.dot(b_neg.to(b_kv_neg.dtype), b_kv_neg, input_precision=PRECISION)


@triton.jit
def apply_summary(b_pos, b_neg, b_kv_pos, b_kv_neg, b_ks_pos, b_ks_neg, PRECISION: tl.constexpr):
    """n = φ·KV [BS, D] and z = φ·κ [BS] (fp32) for rows φ₊, φ₋ [BS, F] against KV's and κ's halves."""
    b_n = _times_summary(b_pos, b_neg, b_kv_pos, b_kv_neg, PRECISION)
    return b_n, tl.sum(b_pos * b_ks_pos[None, :], 1) + tl.sum(b_neg * b_ks_neg[None, :], 1)


@triton.jit
def query_grads(b_pos, b_neg, b_w, b_dn, b_dz, b_kv_pos, b_kv_neg, b_ks_pos, b_ks_neg, dpsi,
                PRECISION: tl.constexpr):
    """The query side's backward for rows with φ₊, φ₋ [BS, F] (fp32), ψ's weight [D, F], dn [BS, D] (the
    summary's dtype) and dz [BS] (fp32) against the summary KV's halves [F, D] and κ's [F]: dψ [BS, F] (rounded
    to the dtype of the dpsi pointer once: the dq product's operand and what dW is summed from) and
    dq = dψ·Wᵀ [BS, D] (fp32)."""
    b_dpos = tl.dot(b_dn, tl.trans(b_kv_pos), input_precision=PRECISION) + b_dz[:, None] * b_ks_pos[None, :]
    b_dneg = tl.dot(b_dn, tl.trans(b_kv_neg), input_precision=PRECISION) + b_dz[:, None] * b_ks_neg[None, :]
    b_dpsi = softmax_jacobian(b_pos, b_neg, b_dpos, b_dneg).to(dpsi.dtype.element_ty)  # [BS, F]
    return b_dpsi, tl.dot(b_dpsi, tl.trans(b_w), input_precision=PRECISION)


@triton.jit
def key_grads(b_pos, b_neg, b_w, b_v, b_dkv_pos, b_dkv_neg, b_dks_pos, b_dks_neg, b_row_scale, dpsi,
              PRECISION: tl.constexpr):
    """The key side's backward for rows with φ₊, φ₋ [BS, F] (fp32) and v [BS, D] against dKV's halves [F, D]
    and dκ's [F], the summary being Σ_rows (row_scale·φ)ᵀ[v, 1]: dv = φ·dKV [BS, D] (fp32, row_scale not
    applied), dψ [BS, F] (in the dpsi pointer's dtype) and dk = dψ·Wᵀ [BS, D] (fp32). b_row_scale: a scalar or
    [BS, 1]."""
    b_dv = _times_summary(b_pos, b_neg, b_dkv_pos, b_dkv_neg, PRECISION)  # [BS, D]
    b_dpos = (tl.dot(b_v, tl.trans(b_dkv_pos), input_precision=PRECISION) + b_dks_pos[None, :]) * b_row_scale
    b_dneg = (tl.dot(b_v, tl.trans(b_dkv_neg), input_precision=PRECISION) + b_dks_neg[None, :]) * b_row_scale
    b_dpsi = softmax_jacobian(b_pos, b_neg, b_dpos, b_dneg).to(dpsi.dtype.element_ty)  # [BS, F]
    return b_dv, b_dpsi, tl.dot(b_dpsi, tl.trans(b_w), input_precision=PRECISION)


@triton.jit
def linear_attention_fwd_kernel(
    q, weight, bias, kv, ksum, o, den,
    stride_qb, stride_qs, stride_qh, stride_ob, stride_os, stride_oh,
    H, S,
    D: tl.constexpr, F: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr,
):
    i_b, i_h, offs_s, s_ok, _, b_pos, b_neg = block_phi(q, weight, bias, stride_qb, stride_qs, stride_qh, H, S,
                                                        D, F, BLOCK_S, PRECISION)
    i_bh = tl.program_id(1)
    b_kv_pos, b_kv_neg, b_ks_pos, b_ks_neg = load_summary(kv, ksum, i_bh, D, F)
    b_n, b_z = apply_summary(b_pos, b_neg, b_kv_pos, b_kv_neg, b_ks_pos, b_ks_neg, PRECISION)
    offs_d = tl.arange(0, D)
    tl.store(o + i_b.to(tl.int64) * stride_ob + i_h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
             (b_n / b_z[:, None]).to(o.dtype.element_ty), mask=s_ok[:, None])
    tl.store(den + i_bh.to(tl.int64) * S + offs_s, b_z, mask=s_ok)


@triton.jit
def linear_attention_bwd_query_kernel(
    q, weight, bias, kv, ksum, do, den, dden, dq, dpsi,
    stride_qb, stride_qs, stride_qh, stride_gb, stride_gs, stride_gh,
    stride_dqb, stride_dqs, stride_dqh, stride_pb, stride_ps, stride_ph,
    H, S,
    D: tl.constexpr, F: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr,
):
    i_b, i_h, offs_s, s_ok, b_w, b_pos, b_neg = block_phi(q, weight, bias, stride_qb, stride_qs, stride_qh, H, S,
                                                          D, F, BLOCK_S, PRECISION)
    i_bh = tl.program_id(1)
    b_kv_pos, b_kv_neg, b_ks_pos, b_ks_neg = load_summary(kv, ksum, i_bh, D, F)
    offs_d, offs_f = tl.arange(0, D), tl.arange(0, F)
    b_n = _times_summary(b_pos, b_neg, b_kv_pos, b_kv_neg, PRECISION)  # [BS, D]
    row = i_bh.to(tl.int64) * S + offs_s
    b_z = tl.load(den + row, mask=s_ok, other=1.)  # [BS]
    # Rows past S load do = 0, so their dn, dz and dψ are exactly 0.
    b_do = tl.load(do + i_b.to(tl.int64) * stride_gb + i_h * stride_gh + offs_s[:, None] * stride_gs + offs_d[None, :],
                   mask=s_ok[:, None], other=0.).to(tl.float32)  # [BS, D]
    b_dz = -tl.sum(b_do * b_n, 1) / (b_z * b_z)  # [BS]
    b_dn = (b_do / b_z[:, None]).to(b_kv_pos.dtype)  # [BS, D]
    b_dpsi, b_dq = query_grads(b_pos, b_neg, b_w, b_dn, b_dz, b_kv_pos, b_kv_neg, b_ks_pos, b_ks_neg,
                               dpsi, PRECISION)
    tl.store(dq + i_b.to(tl.int64) * stride_dqb + i_h * stride_dqh + offs_s[:, None] * stride_dqs + offs_d[None, :],
             b_dq.to(dq.dtype.element_ty), mask=s_ok[:, None])
    tl.store(dpsi + i_b.to(tl.int64) * stride_pb + i_h * stride_ph + offs_s[:, None] * stride_ps + offs_f[None, :],
             b_dpsi, mask=s_ok[:, None])
    tl.store(dden + row, b_dz, mask=s_ok)


@triton.jit
def linear_attention_bwd_key_kernel(
    k, weight, bias, v, dkv, dksum, dk, dv, dpsi, inv_keys,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh, stride_pb, stride_ps, stride_ph,
    H, L, SKIP,
    D: tl.constexpr, F: tl.constexpr, BLOCK_S: tl.constexpr, HAS_SKIP: tl.constexpr, PRECISION: tl.constexpr,
):
    # HAS_SKIP: the keys at multiples of SKIP were left out of the summary; their rows get zeros.
    i_b, i_h, offs_s, s_ok, b_w, b_pos, b_neg = block_phi(k, weight, bias, stride_kb, stride_ks, stride_kh, H, L,
                                                          D, F, BLOCK_S, PRECISION)
    b_kept = _kept(offs_s, L, SKIP, HAS_SKIP).to(tl.float32)[:, None]
    b_dkv_pos, b_dkv_neg, b_dks_pos, b_dks_neg = load_summary(dkv, dksum, tl.program_id(1), D, F)
    offs_d, offs_f = tl.arange(0, D), tl.arange(0, F)
    b_v = tl.load(v + i_b.to(tl.int64) * stride_vb + i_h * stride_vh + offs_s[:, None] * stride_vs + offs_d[None, :],
                  mask=s_ok[:, None], other=0.)  # [BS, D]
    # dKV and dκ come as sums over the queries, not means: the 1/L of KV = (1/L)Σ… is applied here, in fp32.
    b_dv, b_dpsi, b_dk = key_grads(b_pos, b_neg, b_w, b_v, b_dkv_pos, b_dkv_neg, b_dks_pos, b_dks_neg,
                                   inv_keys * b_kept, dpsi, PRECISION)
    b_dv = b_dv * b_kept
    tl.store(dk + i_b.to(tl.int64) * stride_dkb + i_h * stride_dkh + offs_s[:, None] * stride_dks + offs_d[None, :],
             b_dk.to(dk.dtype.element_ty), mask=s_ok[:, None])
    tl.store(dv + i_b.to(tl.int64) * stride_dvb + i_h * stride_dvh + offs_s[:, None] * stride_dvs + offs_d[None, :],
             (b_dv * inv_keys).to(dv.dtype.element_ty), mask=s_ok[:, None])
    tl.store(dpsi + i_b.to(tl.int64) * stride_pb + i_h * stride_ph + offs_s[:, None] * stride_ps + offs_f[None, :],
             b_dpsi, mask=s_ok[:, None])


def summary_sums(x, weight, bias, values, den=None, dden=None, skip_every=0):
    """Σ_j φ(x_j)ᵀ values_j [B, H, 2F, D] and Σ_j φ(x_j) [B, H, 2F] over the tokens of x, fp32, through the
    summary kernel and a torch sum of its per-chunk partials; with den and dden ([B, H, S], fp32), values_j is
    divided by den_j and φ(x_j) weighted by dden_j in the second sum. skip_every > 0 leaves out the tokens at
    its multiples."""
    B, S, H, D = x.shape
    F = weight.shape[-1]
    config = CONFIGS["summary"]
    config = {**config, "BLOCK_D": min(config["BLOCK_D"], D)}
    chunks = triton.cdiv(S, config["CHUNK_S"])
    partial_kv = torch.empty(chunks, B, H, 2 * F, D, device=x.device, dtype=torch.float32)
    partial_sum = torch.empty(chunks, B, H, 2 * F, device=x.device, dtype=torch.float32)
    weighted = den is not None
    linear_attention_summary_kernel[(chunks * (D // config["BLOCK_D"]), B * H)](
        x, weight, bias, values, den if weighted else x, dden if weighted else x, partial_kv, partial_sum,
        x.stride(0), x.stride(1), x.stride(2), values.stride(0), values.stride(1), values.stride(2),
        H, S, max(skip_every, 1),
        D=D, F=F, WEIGHTED=weighted, HAS_SKIP=skip_every > 0, PRECISION=input_precision(x.dtype), **config,
    )
    return partial_kv.sum(0), partial_sum.sum(0)


def linear_attention_fwd(q, k, v, weight_q, bias_q, weight_k, bias_k):
    B, S, H, D = q.shape
    F = weight_q.shape[-1]
    kv_sum, key_sum = summary_sums(k, weight_k, bias_k, v)
    kv, ksum = (kv_sum / k.shape[1]).to(q.dtype), key_sum / k.shape[1]  # means over the keys
    o = torch.empty_like(q)
    den = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    config = CONFIGS["fwd"]
    linear_attention_fwd_kernel[(triton.cdiv(S, config["BLOCK_S"]), B * H)](
        q, weight_q, bias_q, kv, ksum, o, den,
        q.stride(0), q.stride(1), q.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H, S,
        D=D, F=F, PRECISION=input_precision(q.dtype), **config,
    )
    return o, kv, ksum, den


def linear_attention_bwd(do, q, k, v, weight_q, bias_q, weight_k, bias_k, kv, ksum, den):
    B, S, H, D = q.shape
    L, F = k.shape[1], weight_q.shape[-1]
    precision = input_precision(q.dtype)
    dq = torch.empty_like(q)
    dpsi_q = torch.empty(B, S, H, F, device=q.device, dtype=q.dtype)
    dden = torch.empty_like(den)
    config = CONFIGS["bwd_query"]
    linear_attention_bwd_query_kernel[(triton.cdiv(S, config["BLOCK_S"]), B * H)](
        q, weight_q, bias_q, kv, ksum, do, den, dden, dq, dpsi_q,
        q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), dpsi_q.stride(0), dpsi_q.stride(1), dpsi_q.stride(2),
        H, S,
        D=D, F=F, PRECISION=precision, **config,
    )
    dkv, dksum = summary_sums(q, weight_q, bias_q, do, den, dden)
    dk, dv, dpsi_k = summary_bwd(k, v, weight_k, bias_k, dkv.to(k.dtype), dksum, 1.0 / L)
    return dq, dk, dv, dpsi_q, dpsi_k


def summary_bwd(k, v, weight, bias, dkv, dksum, inv_keys: float, skip_every=0):
    """The key pass: dk, dv and dψ_k [B, L, H, F] from dKV [B, H, 2F, D] (k's dtype) and dκ [B, H, 2F] (fp32),
    for a summary of sums over the L keys scaled by inv_keys (1/L for means, 1 for sums), without the keys at
    multiples of skip_every when it is > 0 (zeros there)."""
    B, L, H, D = k.shape
    F = weight.shape[-1]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dpsi = torch.empty(B, L, H, F, device=k.device, dtype=k.dtype)
    config = CONFIGS["bwd_key"]
    linear_attention_bwd_key_kernel[(triton.cdiv(L, config["BLOCK_S"]), B * H)](
        k, weight, bias, v, dkv, dksum, dk, dv, dpsi, inv_keys,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        dpsi.stride(0), dpsi.stride(1), dpsi.stride(2),
        H, L, max(skip_every, 1),
        D=D, F=F, HAS_SKIP=skip_every > 0, PRECISION=input_precision(k.dtype), **config,
    )
    return dk, dv, dpsi


class LinearAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, weight_q, bias_q, weight_k, bias_k):
        o, kv, ksum, den = linear_attention_fwd(q, k, v, weight_q, bias_q, weight_k, bias_k)
        ctx.save_for_backward(q, k, v, weight_q, bias_q, weight_k, bias_k, kv, ksum, den)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, weight_q, bias_q, weight_k, bias_k, kv, ksum, den = ctx.saved_tensors
        do = do if do.stride(-1) == 1 else do.contiguous()
        dq, dk, dv, dpsi_q, dpsi_k = linear_attention_bwd(do, q, k, v, weight_q, bias_q, weight_k, bias_k,
                                                          kv, ksum, den)
        # dW and db from the stored dψ in torch, not per-chunk [D, F] partials inside the query and key passes:
        # those would save writing and re-reading dψ (about 0.1 ms a map at Wan-1.3B) but need a 64-register
        # fp32 accumulator a thread beside φ, dφ and the dq/dv tiles, which already fill the register file.
        dweight_q, dbias_q = parameter_grads(q, dpsi_q, bias_q, *ctx.needs_input_grad[3:5])
        dweight_k, dbias_k = parameter_grads(k, dpsi_k, bias_k, *ctx.needs_input_grad[5:7])
        return dq, dk, dv, dweight_q, dbias_q, dweight_k, dbias_k


class LinearSummaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, weight, bias, skip_every):
        kv_sum, key_sum = summary_sums(k, weight, bias, v, skip_every=skip_every)
        ctx.save_for_backward(k, v, weight, bias)
        ctx.skip_every = skip_every
        return torch.cat([kv_sum, key_sum.unsqueeze(-1)], dim=-1).to(k.dtype)

    @staticmethod
    def backward(ctx, dsummary):
        k, v, weight, bias = ctx.saved_tensors
        dkv, dksum = dsummary[..., :-1].contiguous(), dsummary[..., -1].float().contiguous()
        dk, dv, dpsi = summary_bwd(k, v, weight, bias, dkv, dksum, 1.0, ctx.skip_every)
        dweight, dbias = parameter_grads(k, dpsi, bias, *ctx.needs_input_grad[2:4])
        return dk, dv, dweight, dbias, None


def linear_summary(k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   skip_every: int = 0) -> torch.Tensor:
    """Σ_j φ(k_j)ᵀ[v_j, 1] = [B, H, 2F, D+1] in k's dtype (fp32 sums inside), with φ computed inside the kernels
    and never stored: the `hybrid` variant's linear-key summary. k, v: [B, L, H, D]; weight [H, D, F] and bias
    [H, F] in k's dtype (`FeatureMap` with hidden_dim = 0). skip_every = R > 0 sums over the keys j with
    j mod R ≠ 0 only (the hybrid's linear keys, read in place: no gathered copy). Differentiable in every tensor
    argument."""
    B, L, H, D = k.shape
    if v.shape != k.shape:
        raise ValueError(f"v must be [B, L, H, D] = {tuple(k.shape)}, got {tuple(v.shape)}")
    F = weight.shape[-1]
    if weight.shape != (H, D, F) or bias.shape != (H, F):
        raise ValueError(f"φ's weight must be [H, D, F] = {(H, D, F)} and bias [H, F], "
                         f"got {tuple(weight.shape)}, {tuple(bias.shape)}")
    if any(t.dtype != k.dtype for t in (v, weight, bias)):
        raise ValueError(f"v and the feature map's parameters must be in k's dtype {k.dtype}")
    reason = unsupported_reason(k, weight)
    if reason:
        raise ValueError(f"linear_summary kernel: {reason}")
    if isinstance(skip_every, bool) or not isinstance(skip_every, int) or skip_every < 0:
        raise ValueError(f"skip_every must be an int ≥ 0, got {skip_every!r}")
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    return LinearSummaryFunction.apply(k, v, weight.contiguous(), bias.contiguous(), skip_every)


def unsupported_reason(q: torch.Tensor, weight_q: torch.Tensor) -> str | None:
    """Why `linear_attention` cannot run on q [B, S, H, D] with φ_q's weight [H, D, F], or None when it can:
    the feature-map kernel's limits (fp16, bf16 or fp32; D and F powers of two ≥ 16; CUDA or the interpreter)."""
    return fm.unsupported_reason(q, weight_q, linear_attention_fwd_kernel)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight_q: torch.Tensor,
    bias_q: torch.Tensor,
    weight_k: torch.Tensor,
    bias_k: torch.Tensor,
) -> torch.Tensor:
    """o_i = φ_q(q_i)·Σ_j φ_k(k_j)ᵀv_j / (φ_q(q_i)·Σ_j φ_k(k_j)) with φ = softmax([xW + b, −(xW + b)]) per head
    (Triton, CUDA or interpreter); see the module docstring.

    Args:
        q: [B, S, H, D] queries; fp16, bf16 or fp32; D a power of two ≥ 16; any strides with a contiguous last dim.
        k, v: [B, L, H, D] keys and values in q's dtype, likewise.
        weight_q, weight_k: [H, D, F], F a power of two ≥ 16, and bias_q, bias_k: [H, F]: the two feature maps'
            parameters (`FeatureMap` with hidden_dim = 0), in q's dtype.

    Returns:
        o: [B, S, H, D] in q's dtype and strides. Differentiable in every argument.
    """
    B, S, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (H, D):
        raise ValueError(f"k and v must be [B, L, H, D] matching q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}")
    F = weight_q.shape[-1]
    for name, weight, bias in (("q", weight_q, bias_q), ("k", weight_k, bias_k)):
        if weight.shape != (H, D, F) or bias.shape != (H, F):
            raise ValueError(f"φ_{name}'s weight must be [H, D, F] = {(H, D, F)} and bias [H, F], "
                             f"got {tuple(weight.shape)}, {tuple(bias.shape)}")
    if any(t.dtype != q.dtype for t in (k, v, weight_q, bias_q, weight_k, bias_k)):
        raise ValueError(f"k, v and the feature maps' parameters must be in q's dtype {q.dtype}")
    reason = unsupported_reason(q, weight_q)
    if reason:
        raise ValueError(f"linear_attention kernel: {reason}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    params = (t.contiguous() for t in (weight_q, bias_q, weight_k, bias_k))
    return LinearAttentionFunction.apply(q, k, v, *params)


__all__ = ["linear_attention", "linear_summary", "unsupported_reason"]
