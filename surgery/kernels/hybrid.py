"""Hybrid attention: exact softmax over the keys at raster indices 0, R, 2R, … plus linear attention over
the others, under one shared normaliser (the `hybrid` variant's math, `variants/hybrid.py`).

Per batch and head, with T_S = {0, R, 2R, …} (S' = ⌈S/R⌉ keys), s_ij = scale·q_i·k_j, c_i = max_{j∈T_S} s_ij
and the linear summary KV = Σ_{j∈T_L} φ_k(k_j)ᵀ[v_j, 1] ([2F, D+1], made by the caller in PyTorch):

    out_i = (A_i + N_i) / (l_i + E_i),   A_i = Σ_{j∈T_S} exp(s_ij − c_i) v_j,   l_i = Σ_{j∈T_S} exp(s_ij − c_i),
                                         [N_i, E_i] = φ_q(q_i)·KV.

Forward: one program per (query block, batch·head) runs an online softmax over T_S, loading k[:, j·R] and
v[:, j·R] with TMA through descriptors over the strided views k[:, ::R], v[:, ::R] (no gather copy; against
pointer loads, −10% at R = 8 and −13% at R = 4 on an H100, bench/NOTES.md), and tracks the running
max m, sum l and the argmax key. At the end m = c, so acc and l are already in units of exp(s − c) and the
linear terms φ_q·KV are added unscaled: out = (acc + N) / (l + E). It stores the denominator den = l + E,
lse = c + ln den and the argmax. Where no input needs a gradient (inference) it tracks and stores none of
the three, with its own launch settings (`CONFIGS["fwd_inference"]`).

Backward. With Δ_i = do_i·o_i and P_ij = exp(s_ij − c_i)/den_i = exp(s_ij − lse_i):

    dv_j     = Σ_i P_ij do_i
    ds_ij    = P_ij (do_i·v_j − Δ_i) + dc_i·[j = argmax_i]        (dq = scale·ds·K_S, dk_S = scale·dsᵀ·Q)
    dlin_i   = [do_i, −Δ_i] / den_i                              (the gradient of φ_q(q_i)·KV)
    dφ_q(q_i) = KV·dlin_i,   dKV = Σ_i φ_q(q_i)ᵀ dlin_i
    dc_i     = (do_i·N_i − Δ_i E_i)/den_i = φ_q(q_i)·dφ_q(q_i)

dc is not zero because A and l scale as exp(−c) and N, E do not: ∂o_i/∂c_i = (o_i l_i − A_i)/den_i =
(N_i − o_i E_i)/den_i. c is a max, so its gradient goes to the maximising score: the kernels give it to
the first maximal key, torch's amax splits it among exact ties (they differ only at exact ties).

These are flash attention's backward formulas with the hybrid's P, lse and o (its Δ = rowsum(do∘o)): a
softmax-attention backward that recomputes P = exp(s − lse) from a given lse and takes Δ from a given o,
as cuDNN's does, computes every softmax term when handed the hybrid's lse and o. Only dc is left.

Kernels: forward; a preprocess pass per query block (Δ, dc, dφ_q, dlin, with fp32 sums); then the softmax
terms, one of two ways:
- cuDNN's fused SDPA backward on (do, q, K_S, V_S, o, lse), then one pass adding dc at the argmax to dq
  and, atomically, to dk. The fast path on GPUs (the op's backward 1.75× as fast at Wan's shape, R = 8;
  BENCHMARKS.md), but cuDNN accumulates dq atomically: not bit-repeatable.
- As in `block_sparse`, two recompute passes with no atomics, so the backward is deterministic:
  query-major for dq and key-major for dk_S, dv_S (over query chunks with fp32 partials when few softmax
  keys would leave the GPU idle). Under `torch.use_deterministic_algorithms`, and wherever cuDNN's SDPA
  does not apply (`softmax_backward_for`).
dKV = φ_qᵀ·dlin is two batched matmuls in torch (numerator, denominator).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The score-gradient steps are block_sparse's: dq's take the normaliser's gradient as arguments, dk/dv's get it
# added here.
from .common import (LN2, LOG2E, check_qkv, dkv_ds, dq_slot_steps, fitted_to_dtype, input_precision, row_blocks,
                     slot_steps)
from .cudnn_attention import cudnn_attention_applies, cudnn_attention_backward

# Launch settings: the fastest of `bench/hybrid.py --sweep` at head_dim 128, R = 4 on H100
# (bench/NOTES.md, "Launch settings"; fwd and fwd_inference with TMA key loads); the tests shrink the
# blocks.
CONFIGS = {
    "fwd": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    "fwd_inference": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    "preprocess": dict(BLOCK_M=64, num_warps=4, num_stages=2),
    "dq": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    "dkv": dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
    "max_grad": dict(BLOCK_M=64, num_warps=4),
}
# The key-major dk/dv pass splits its queries into chunks until it has about this many programs (H200, 1.3B
# shape, op fwd+bwd: 4096 took 9–10% off at R = 2, 4 and 8, against no split; 1024 or 2048 gained less).
DKV_MIN_PROGRAMS = 4096
# φ_q·KV runs over the 2F features in chunks of at most this many (one [BM, BF] × [BF, D] product each).
MAX_BLOCK_F = 64


@triton.jit
def _head_rows(x, i_b, i_h, offs, ok, stride_b, stride_s, stride_h, offs_d):
    """Rows `offs` of batch i_b, head i_h of a [B, S, H, D] tensor: [len(offs), D], zeros where not `ok`."""
    return tl.load(x + i_b.to(tl.int64) * stride_b + i_h * stride_h + offs[:, None] * stride_s + offs_d[None, :],
                   mask=ok[:, None], other=0.)


@triton.jit
def _backward_row_stats(lse, delta, dc, amax, row, ok):
    """Per query row for the backward: its log-sum-exp in log2 units, δ = rowsum(dO∘O), the gradient dc of
    the shared normaliser through the running max, and the softmax key that held that max."""
    return (tl.load(lse + row, mask=ok, other=0.) * LOG2E, tl.load(delta + row, mask=ok, other=0.),
            tl.load(dc + row, mask=ok, other=0.), tl.load(amax + row, mask=ok, other=-1))


@triton.jit
def hybrid_fwd_kernel(
    q, k_rows, v_rows, phi, kv_num, kv_den, o, lse, den, amax, scale,
    stride_qb, stride_qs, stride_qh, stride_pb, stride_ps, stride_ph, stride_ob, stride_os, stride_oh,
    H, S, SK, F2,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
    HAS_LINEAR: tl.constexpr, PRECISION: tl.constexpr, STATS: tl.constexpr,
):
    # STATS: store what the backward needs (lse, den, the argmax). Inference skips them, and the argmax's
    # indexed reduction with them.
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < S
    offs_d = tl.arange(0, D)
    b_q = _head_rows(q, i_b, i_h, offs_m, m_ok, stride_qb, stride_qs, stride_qh, offs_d)  # [BM, D]
    qk_scale = scale * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    a_i = tl.zeros([BLOCK_M], tl.int32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    m_i, l_i, a_i, acc = slot_steps(b_q, k_rows, v_rows, i_b, i_h, 0, SK, qk_scale, m_i, l_i, a_i, acc, BLOCK_N, D,
                                     PRECISION, STATS)

    if HAS_LINEAR:
        # m_i is now c_i: the linear terms join acc and l without rescaling.
        p_base = phi + i_b.to(tl.int64) * stride_pb + i_h * stride_ph
        kvn_base = kv_num + i_bh.to(tl.int64) * F2 * D
        kvd_base = kv_den + i_bh.to(tl.int64) * F2
        # Not software-pipelined: with Triton 3.6 on an H100, pipelining this loop behind the pipelined key loop
        # raced (outputs differed from call to call in ~12% of elements, lse equal); at 4 short steps it costs
        # nothing (bench/NOTES.md, "Hybrid and linear").
        for f0 in tl.range(0, F2, BLOCK_F, num_stages=1):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            f_ok = offs_f < F2
            b_phi = tl.load(p_base + offs_m[:, None] * stride_ps + offs_f[None, :], mask=m_ok[:, None] & f_ok[None, :],
                            other=0.)  # [BM, BF]
            b_kvn = tl.load(kvn_base + offs_f[:, None] * D + offs_d[None, :], mask=f_ok[:, None], other=0.)  # [BF, D]
            b_kvd = tl.load(kvd_base + offs_f, mask=f_ok, other=0.).to(tl.float32)  # [BF]
            acc += tl.dot(b_phi, b_kvn, input_precision=PRECISION)
            l_i += tl.sum(b_phi.to(tl.float32) * b_kvd[None, :], 1)

    tl.store(o + i_b.to(tl.int64) * stride_ob + i_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
             (acc / l_i[:, None]).to(o.dtype.element_ty), mask=m_ok[:, None])
    if STATS:
        row = i_bh.to(tl.int64) * S + offs_m
        tl.store(lse + row, (m_i + tl.log2(l_i)) * LN2, mask=m_ok)
        tl.store(den + row, l_i, mask=m_ok)
        tl.store(amax + row, a_i, mask=m_ok)


@triton.jit
def hybrid_bwd_preprocess_kernel(
    o, do, den, delta, dc, phi, kv_num, kv_den, dphi, dlin_num, dlin_den,
    stride_ob, stride_os, stride_oh, stride_gb, stride_gs, stride_gh, stride_pb, stride_ps, stride_ph,
    stride_lb, stride_ls, stride_lh,
    H, S, F2,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, HAS_LINEAR: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < S
    offs_d = tl.arange(0, D)
    b_o = _head_rows(o, i_b, i_h, offs_m, m_ok, stride_ob, stride_os, stride_oh, offs_d).to(tl.float32)  # [BM, D]
    b_do = _head_rows(do, i_b, i_h, offs_m, m_ok, stride_gb, stride_gs, stride_gh, offs_d).to(tl.float32)
    b_delta = tl.sum(b_o * b_do, 1)
    row = i_bh.to(tl.int64) * S + offs_m
    tl.store(delta + row, b_delta, mask=m_ok)
    b_dc = tl.zeros([BLOCK_M], tl.float32)
    if HAS_LINEAR:
        b_den = tl.load(den + row, mask=m_ok, other=1.)
        b_g = b_do / b_den[:, None]  # [BM, D] gradient of the linear numerator N
        b_w = b_delta / b_den  # [BM] minus the gradient of the linear denominator E
        l_base = dlin_num + i_b.to(tl.int64) * stride_lb + i_h * stride_lh + offs_m * stride_ls
        tl.store(l_base[:, None] + offs_d[None, :], b_g.to(dlin_num.dtype.element_ty), mask=m_ok[:, None])
        tl.store(dlin_den + row, (-b_w).to(dlin_den.dtype.element_ty), mask=m_ok)
        p_off = i_b.to(tl.int64) * stride_pb + i_h * stride_ph + offs_m[:, None] * stride_ps
        kvn_base = kv_num + i_bh.to(tl.int64) * F2 * D
        kvd_base = kv_den + i_bh.to(tl.int64) * F2
        for f0 in range(0, F2, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            f_ok = offs_f < F2
            b_kvn = tl.load(kvn_base + offs_f[:, None] * D + offs_d[None, :], mask=f_ok[:, None], other=0.)  # [BF, D]
            b_kvd = tl.load(kvd_base + offs_f, mask=f_ok, other=0.).to(tl.float32)  # [BF]
            b_dphi = tl.dot(b_g.to(b_kvn.dtype), tl.trans(b_kvn), input_precision=PRECISION) \
                - b_w[:, None] * b_kvd[None, :]  # [BM, BF]
            mf_ok = m_ok[:, None] & f_ok[None, :]
            b_phi = tl.load(phi + p_off + offs_f[None, :], mask=mf_ok, other=0.).to(tl.float32)  # [BM, BF]
            # dc from the fp32 dφ_q, before it is rounded to φ's dtype.
            b_dc += tl.sum(b_phi * b_dphi, 1)
            tl.store(dphi + p_off + offs_f[None, :], b_dphi.to(dphi.dtype.element_ty), mask=mf_ok)
    tl.store(dc + row, b_dc, mask=m_ok)


@triton.jit
def hybrid_bwd_dq_kernel(
    q, k_rows, v_rows, do, dq, lse, delta, dc, amax, scale,
    stride_qb, stride_qs, stride_qh, stride_gb, stride_gs, stride_gh, stride_db, stride_ds, stride_dh,
    H, S, SK,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < S
    offs_d = tl.arange(0, D)
    b_q = _head_rows(q, i_b, i_h, offs_m, m_ok, stride_qb, stride_qs, stride_qh, offs_d)  # [BM, D]
    b_do = _head_rows(do, i_b, i_h, offs_m, m_ok, stride_gb, stride_gs, stride_gh, offs_d)  # [BM, D]
    b_lse, b_delta, b_dc, b_a = _backward_row_stats(lse, delta, dc, amax, i_bh.to(tl.int64) * S + offs_m, m_ok)
    qk_scale = scale * LOG2E

    b_dq = tl.zeros([BLOCK_M, D], tl.float32)
    b_dq = dq_slot_steps(b_q, b_do, b_lse, b_delta, k_rows, v_rows, i_b, i_h, 0, SK, b_dq, qk_scale, BLOCK_N, D,
                          PRECISION, b_dc, b_a)
    tl.store(dq + i_b.to(tl.int64) * stride_db + i_h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :],
             (b_dq * scale).to(dq.dtype.element_ty), mask=m_ok[:, None])


@triton.jit
def hybrid_bwd_dkv_kernel(
    q_rows, do_rows, k, v, dk, dv, lse, delta, dc, amax, scale,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_eb, stride_es, stride_eh, stride_ep,
    H, S, SK, Q_CHUNK,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program per (block of softmax keys, chunk of Q_CHUNK queries, batch·head). dk, dv are [B, S', H, D]
    # with strides stride_e*, one such slice per query chunk (stride_ep apart) when there are several. q and dO
    # load through TMA descriptors (rows past the chunk count nothing).
    i_nc, i_bh = tl.program_id(0), tl.program_id(1)
    i_n, i_chunk = i_nc // tl.cdiv(S, Q_CHUNK), i_nc % tl.cdiv(S, Q_CHUNK)
    m_end = tl.minimum((i_chunk + 1) * Q_CHUNK, S)
    i_b, i_h = i_bh // H, i_bh % H
    offs_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < SK
    offs_d = tl.arange(0, D)
    b_k = _head_rows(k, i_b, i_h, offs_n, n_ok, stride_kb, stride_ks, stride_kh, offs_d)  # [BN, D]
    b_v = _head_rows(v, i_b, i_h, offs_n, n_ok, stride_vb, stride_vs, stride_vh, offs_d)  # [BN, D]
    row_base = i_bh.to(tl.int64) * S
    qk_scale = scale * LOG2E

    b_dk = tl.zeros([BLOCK_N, D], tl.float32)
    b_dv = tl.zeros([BLOCK_N, D], tl.float32)
    for m0 in range(i_chunk * Q_CHUNK, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        b_q = q_rows.load([i_b, m0, i_h, 0]).reshape(BLOCK_M, D)
        b_do = do_rows.load([i_b, m0, i_h, 0]).reshape(BLOCK_M, D)
        b_lse, b_delta, b_dc, b_a = _backward_row_stats(lse, delta, dc, amax, row_base + offs_m, m_ok)
        # Transposed scores, keys × queries, so dk and dv accumulate without transposing them.
        b_dst, b_dv = dkv_ds(b_k, b_v, b_q, b_do, b_lse, b_delta, m_ok, b_dv, qk_scale, PRECISION)
        b_dst += tl.where(offs_n[:, None] == b_a[None, :], b_dc[None, :], 0.)
        b_dk = tl.dot(b_dst.to(b_q.dtype), b_q, b_dk, input_precision=PRECISION)
    e_off = (i_chunk.to(tl.int64) * stride_ep + i_b.to(tl.int64) * stride_eb + i_h * stride_eh
             + offs_n[:, None] * stride_es + offs_d[None, :])
    tl.store(dk + e_off, (b_dk * scale).to(dk.dtype.element_ty), mask=n_ok[:, None])
    tl.store(dv + e_off, b_dv.to(dv.dtype.element_ty), mask=n_ok[:, None])


@triton.jit
def hybrid_bwd_max_grad_kernel(
    q, k, dq_soft, dq, dk, dc, amax, scale,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_gb, stride_gs, stride_gh,
    stride_db, stride_ds, stride_dh, stride_eb, stride_es, stride_eh,
    H, S,
    D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """The normaliser's gradient dc_i, which goes to the score of query i's argmax key a_i, added to a plain
    softmax backward's dq and dk: dq_i = dq_soft_i + scale·dc_i·k_{a_i} and dk_{a_i} += scale·dc_i·q_i
    (atomically, into fp32 dk)."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < S
    offs_d = tl.arange(0, D)
    row = i_bh.to(tl.int64) * S + offs_m
    b_dc = tl.load(dc + row, mask=m_ok, other=0.) * scale
    b_a = tl.load(amax + row, mask=m_ok, other=0)
    b_k = _head_rows(k, i_b, i_h, b_a, m_ok, stride_kb, stride_ks, stride_kh, offs_d).to(tl.float32)  # [BM, D]
    b_dq = _head_rows(dq_soft, i_b, i_h, offs_m, m_ok, stride_gb, stride_gs, stride_gh, offs_d).to(tl.float32)
    tl.store(dq + i_b.to(tl.int64) * stride_db + i_h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :],
             (b_dq + b_dc[:, None] * b_k).to(dq.dtype.element_ty), mask=m_ok[:, None])
    b_q = _head_rows(q, i_b, i_h, offs_m, m_ok, stride_qb, stride_qs, stride_qh, offs_d).to(tl.float32)
    tl.atomic_add(dk + i_b.to(tl.int64) * stride_eb + i_h * stride_eh + b_a[:, None] * stride_es + offs_d[None, :],
                  b_dc[:, None] * b_q, mask=m_ok[:, None], sem="relaxed")


def _block_f(features: int) -> int:
    return max(16, min(MAX_BLOCK_F, triton.next_power_of_2(features)))


def _split_summary(kv_summary: torch.Tensor | None, like: torch.Tensor):
    """KV [B, H, 2F, D+1] → numerator [B, H, 2F, D] and denominator [B, H, 2F], contiguous in φ's dtype
    (rows of D+1 would make every kernel load unaligned); placeholders when there is no linear branch."""
    if kv_summary is None:
        return like, like
    kv_summary = kv_summary.to(like.dtype)
    return kv_summary[..., :-1].contiguous(), kv_summary[..., -1].contiguous()


def launch_config(name: str, dtype: torch.dtype) -> dict:
    """CONFIGS[name], for 4-byte inputs with the tiles halved each way and at most 2 stages (`fitted_to_dtype`)."""
    return fitted_to_dtype(CONFIGS[name], dtype, halve=("BLOCK_M", "BLOCK_N"), max_stages=2)


def hybrid_fwd(q, k_s, v_s, phi_q, kv_num, kv_den, scale, stats=True):
    """o, and with `stats` what the backward needs: lse, den [B, H, S] fp32 and the argmax [B, H, S] int32
    (else None each)."""
    B, S, H, D = q.shape
    SK = k_s.shape[1]
    has_linear = phi_q is not None
    F2 = phi_q.shape[-1] if has_linear else 0
    phi = phi_q if has_linear else q
    config = launch_config("fwd" if stats else "fwd_inference", q.dtype)
    o = torch.empty_like(q)
    lse = torch.empty(B, H, S, device=q.device, dtype=torch.float32) if stats else o
    den = torch.empty_like(lse) if stats else o
    amax = torch.empty(B, H, S, device=q.device, dtype=torch.int32) if stats else o
    k_rows, v_rows = (row_blocks(t, config["BLOCK_N"]) for t in (k_s, v_s))
    hybrid_fwd_kernel[(triton.cdiv(S, config["BLOCK_M"]), B * H)](
        q, k_rows, v_rows, phi, kv_num, kv_den, o, lse, den, amax, scale,
        q.stride(0), q.stride(1), q.stride(2), phi.stride(0), phi.stride(1), phi.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        H, S, SK, F2,
        D=D, BLOCK_F=_block_f(F2), HAS_LINEAR=has_linear, PRECISION=input_precision(q.dtype), STATS=stats,
        **config,
    )
    return (o, lse, den, amax) if stats else (o, None, None, None)


def cudnn_softmax_backward(do, q, k, v, o, lse, scale):
    """dq, dk, dv of softmax attention o = softmax(scale·q·kᵀ)·v through cuDNN's fused backward, in this op's
    layout. q, do, o: [B, S, H, D]; k, v: [B, S', H, D]; lse [B, H, S] (natural log)."""
    heads_first = lambda t: t.transpose(1, 2)  # cuDNN takes [B, H, S, D] views
    k, v = k.contiguous(), v.contiguous()  # the strided views k[:, ::R] are copied: S' rows, cheap
    grads = cudnn_attention_backward(heads_first(do), heads_first(q), heads_first(k), heads_first(v), heads_first(o),
                                     lse, scale)
    return tuple(heads_first(g) for g in grads)


def softmax_backward_for(q):
    """The softmax backward the hybrid backward hands its T_S branch to, or None for its own two passes.

    cuDNN's where it applies (`cudnn_attention_applies`): about half the time of our recompute passes at Wan's
    shape (BENCHMARKS.md). Under `torch.use_deterministic_algorithms`, for fp32, and where cuDNN's SDPA is off
    or unavailable, the deterministic Triton passes run instead."""
    return cudnn_softmax_backward if cudnn_attention_applies(q, backward=True) else None


def hybrid_bwd(do, q, k_s, v_s, phi_q, kv_num, kv_den, o, lse, den, amax, scale, softmax_backward=None):
    """Gradients of q, k_s, v_s, φ_q and KV. `softmax_backward(do, q, k, v, o, lse, scale) → dq, dk, dv`, when
    given, takes the softmax branch (see the module docstring); else the two recompute passes do."""
    B, S, H, D = q.shape
    has_linear = phi_q is not None
    F2 = phi_q.shape[-1] if has_linear else 0

    delta = torch.empty_like(lse)
    dc = torch.empty_like(lse)
    dphi = torch.empty_like(phi_q) if has_linear else None
    # dlin = [dlin_num, dlin_den] is kept as two tensors: one of rows of D + 1 would put dKV's matmul on
    # unaligned rows, where cuBLAS falls back to a kernel ~20× slower (1.3 ms at the 1.3B shape).
    dlin_num = torch.empty(B, S, H, D, device=q.device, dtype=phi_q.dtype) if has_linear else None
    dlin_den = torch.empty(B, H, S, device=q.device, dtype=phi_q.dtype) if has_linear else None
    phi, dphi_arg, num_arg, den_arg = (phi_q, dphi, dlin_num, dlin_den) if has_linear else (q, q, q, q)
    config = CONFIGS["preprocess"]
    hybrid_bwd_preprocess_kernel[(triton.cdiv(S, config["BLOCK_M"]), B * H)](
        o, do, den, delta, dc, phi, kv_num, kv_den, dphi_arg, num_arg, den_arg,
        o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        phi.stride(0), phi.stride(1), phi.stride(2), num_arg.stride(0), num_arg.stride(1), num_arg.stride(2),
        H, S, F2,
        D=D, BLOCK_F=_block_f(F2), HAS_LINEAR=has_linear, PRECISION=input_precision(phi.dtype), **config,
    )
    if softmax_backward is not None:
        dq, dk, dv = _softmax_branch_grads(softmax_backward, do, q, k_s, v_s, o, lse, dc, amax, scale)
    else:
        dq, dk, dv = _softmax_branch_grads_triton(do, q, k_s, v_s, lse, delta, dc, amax, scale)
    # dKV = Σ_i φ_q(q_i)ᵀ dlin_i: batched matmuls, fp32 accumulation inside.
    dkv = torch.cat([torch.einsum("bshf,bshd->bhfd", phi_q, dlin_num),
                     torch.einsum("bshf,bhs->bhf", phi_q, dlin_den).unsqueeze(-1)], -1) if has_linear else None
    # [B, H, 2F, D+1]
    return dq, dk, dv, dphi, dkv


def _softmax_branch_grads(softmax_backward, do, q, k_s, v_s, o, lse, dc, amax, scale):
    """dq, dk_S, dv_S from a plain softmax backward over T_S, plus the normaliser's gradient at the argmax."""
    B, S, H, D = q.shape
    dq_soft, dk_soft, dv = softmax_backward(do, q, k_s, v_s, o, lse, scale)
    dq = torch.empty_like(q)
    dk = dk_soft.to(torch.float32, memory_format=torch.contiguous_format)
    config = CONFIGS["max_grad"]
    hybrid_bwd_max_grad_kernel[(triton.cdiv(S, config["BLOCK_M"]), B * H)](
        q, k_s, dq_soft, dq, dk, dc, amax, scale,
        q.stride(0), q.stride(1), q.stride(2), k_s.stride(0), k_s.stride(1), k_s.stride(2),
        dq_soft.stride(0), dq_soft.stride(1), dq_soft.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        H, S,
        D=D, **config,
    )
    return dq, dk.to(k_s.dtype), dv.to(v_s.dtype)


def _softmax_branch_grads_triton(do, q, k_s, v_s, lse, delta, dc, amax, scale):
    """dq, dk_S, dv_S by the two deterministic recompute passes."""
    B, S, H, D = q.shape
    SK = k_s.shape[1]
    precision = input_precision(q.dtype)
    dq = torch.empty_like(q)
    config = launch_config("dq", q.dtype)
    k_rows, v_rows = (row_blocks(t, config["BLOCK_N"]) for t in (k_s, v_s))
    hybrid_bwd_dq_kernel[(triton.cdiv(S, config["BLOCK_M"]), B * H)](
        q, k_rows, v_rows, do, dq, lse, delta, dc, amax, scale,
        q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        H, S, SK,
        D=D, PRECISION=precision, **config,
    )
    config = launch_config("dkv", q.dtype)
    key_programs = triton.cdiv(SK, config["BLOCK_N"]) * B * H
    # Few softmax keys (large R) give few key-major programs, each walking every query: split the queries
    # into chunks with fp32 partial dk, dv per chunk, summed after in a fixed order (still deterministic).
    chunks = min(triton.cdiv(S, config["BLOCK_M"]), max(1, round(DKV_MIN_PROGRAMS / key_programs)))
    q_chunk = triton.cdiv(triton.cdiv(S, chunks), config["BLOCK_M"]) * config["BLOCK_M"]
    chunks = triton.cdiv(S, q_chunk)
    part_dtype = k_s.dtype if chunks == 1 else torch.float32
    dk = torch.empty(chunks, B, SK, H, D, device=q.device, dtype=part_dtype)  # [chunks, B, S', H, D]
    dv = torch.empty_like(dk)
    q_rows, do_rows = (row_blocks(t, config["BLOCK_M"]) for t in (q, do))
    hybrid_bwd_dkv_kernel[(triton.cdiv(SK, config["BLOCK_N"]) * chunks, B * H)](
        q_rows, do_rows, k_s, v_s, dk, dv, lse, delta, dc, amax, scale,
        k_s.stride(0), k_s.stride(1), k_s.stride(2), v_s.stride(0), v_s.stride(1), v_s.stride(2),
        dk.stride(1), dk.stride(2), dk.stride(3), dk.stride(0),
        H, S, SK, q_chunk,
        D=D, PRECISION=precision, **config,
    )
    dk, dv = (t[0] if chunks == 1 else t.sum(0).to(k_s.dtype) for t in (dk, dv))
    return dq, dk, dv


class HybridAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_s, v_s, phi_q, kv_summary, scale, training):
        kv_num, kv_den = _split_summary(kv_summary, phi_q if phi_q is not None else q)
        o, lse, den, amax = hybrid_fwd(q, k_s, v_s, phi_q, kv_num, kv_den, scale, stats=training)
        if training:
            ctx.save_for_backward(q, k_s, v_s, phi_q, kv_num, kv_den, o, lse, den, amax)
        ctx.scale = scale
        ctx.kv_dtype = None if kv_summary is None else kv_summary.dtype
        return o

    @staticmethod
    def backward(ctx, do):
        q, k_s, v_s, phi_q, kv_num, kv_den, o, lse, den, amax = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv, dphi, dkv = hybrid_bwd(do, q, k_s, v_s, phi_q, kv_num, kv_den, o, lse, den, amax,
                                           ctx.scale, softmax_backward_for(q))
        return dq, dk, dv, dphi, None if dkv is None else dkv.to(ctx.kv_dtype), None, None


def _check(q, k, v, phi_q, kv_summary, rate):
    check_qkv(q, k, v)
    B, S, H, D = q.shape
    if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
        raise ValueError(f"rate must be an int ≥ 1, got {rate!r}")
    if (phi_q is None) != (kv_summary is None):
        raise ValueError("phi_q and kv_summary go together: pass both (linear branch) or neither")
    if phi_q is not None:
        F2 = phi_q.shape[-1]
        if phi_q.shape[:3] != (B, S, H) or kv_summary.shape != (B, H, F2, D + 1):
            raise ValueError(f"phi_q must be [B, S, H, 2F] and kv_summary [B, H, 2F, D+1] for q {tuple(q.shape)}, "
                             f"got {tuple(phi_q.shape)}, {tuple(kv_summary.shape)}")


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor | None,
    kv_summary: torch.Tensor | None,
    rate: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention over the keys k[:, ::rate] plus a linear branch, under one normaliser (Triton,
    CUDA or interpreter); see the module docstring for the formula.

    Args:
        q: [B, S, H, D] queries; fp16, bf16 or fp32; D a power of two ≥ 16; any strides with a contiguous last dim.
        k, v: [B, S_kv, H, D] keys and values, all tokens (raster order); the op reads rows 0, R, 2R, … only.
        phi_q: [B, S, H, 2F] φ_q(q), or None for no linear branch (then this is softmax attention over k[:, ::rate]).
        kv_summary: [B, H, 2F, D+1] Σ_{j∈T_L} φ_k(k_j)ᵀ[v_j, 1] over the linear keys, or None with phi_q.
        rate: R ≥ 1.
        scale: softmax scale, default D ** -0.5.

    Returns:
        out [B, S, H, D] in q's dtype and strides. Differentiable in q, k, v, phi_q and kv_summary. Where none of
        them needs a gradient the forward skips what only the backward reads.
    """
    _check(q, k, v, phi_q, kv_summary, rate)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if phi_q is not None and phi_q.stride(-1) != 1:
        phi_q = phi_q.contiguous()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, phi_q, kv_summary))
    # Strided views, not copies: the kernels step through k and v R rows at a time.
    return HybridAttentionFunction.apply(q, k[:, ::rate], v[:, ::rate], phi_q, kv_summary, scale, training)


def hybrid_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor | None,
    kv_summary: torch.Tensor | None,
    rate: int,
    scale: float | None = None,
) -> torch.Tensor:
    """`hybrid_attention` in plain PyTorch through the [B, H, S, S'] score matrix; same arguments and result.
    Computes in fp32 (fp64 for fp64 inputs); differentiable in every tensor argument."""
    _check(q, k, v, phi_q, kv_summary, rate)
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    scores = torch.einsum("bshd,bthd->bhst", q.to(dtype), k[:, ::rate].to(dtype)) * scale  # [B, H, S, S']
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp()
    numerator = torch.einsum("bhst,bthd->bshd", weights, v[:, ::rate].to(dtype))  # [B, S, H, D]
    denominator = weights.sum(dim=-1).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    if phi_q is not None:
        sums = torch.einsum("bshf,bhfe->bshe", phi_q.to(dtype), kv_summary.to(dtype))  # [B, S, H, D+1]
        numerator = numerator + sums[..., :-1]
        denominator = denominator + sums[..., -1:]
    return (numerator / denominator).to(q.dtype)


__all__ = ["hybrid_attention", "hybrid_attention_reference"]
