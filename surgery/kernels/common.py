"""What the attention ops share: constants, launch and precision helpers, TMA row loads, input checks,
the online-softmax forward steps and the score-gradient steps of the backward passes, and the masked
softmax reference they are all checked against.

Each op file (`block_sparse.py`, `selected_blocks.py`, `hybrid.py`, …) holds one op and imports its
pieces from here; a step changes once and every op that walks keys the same way gets it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def input_precision(dtype: torch.dtype) -> str:
    # Full fp32 products for fp32 inputs (tests, references); half inputs use the tensor cores as they are.
    return "ieee" if dtype == torch.float32 else "tf32"


def fitted_to_dtype(config: dict, dtype: torch.dtype, halve: tuple[str, ...] = (), max_stages: int = 1) -> dict:
    """Launch settings swept for half-precision inputs, made to fit shared memory for 4-byte ones: the block sizes
    named in `halve` halved (not below 16) and at most `max_stages` pipeline stages. fp32 tiles take twice the
    shared memory, and at head_dim 128 the swept settings would ask an H100 for more than it has."""
    if torch.finfo(dtype).bits < 32:
        return config
    halved = {b: max(16, config[b] // 2) for b in halve if b in config}
    return {**config, **halved, "num_stages": min(max_stages, config["num_stages"])}


def row_blocks(x: torch.Tensor, rows: int) -> TensorDescriptor:
    """A TMA descriptor over x [B, S, H, D] loading [1, rows, 1, D] blocks (one head's rows), on a compact copy
    where x's layout breaks TMA's 16-byte rules (strided views such as k[:, ::R] of a contiguous k pass)."""
    aligned = x.data_ptr() % 16 == 0 and all(stride * x.element_size() % 16 == 0 for stride in x.stride()[:-1])
    x = x if aligned else x.contiguous()
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, rows, 1, x.shape[-1]])


def check_qkv(q, k, v) -> None:
    """ValueError unless k, v are [B, S_kv, H, D] matching q [B, S, H, D] with D a power of two ≥ 16."""
    B, _, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (H, D):
        raise ValueError(f"k and v must be [B, S_kv, H, D] matching q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}")
    if D < 16 or D & (D - 1):
        raise ValueError(f"head_dim must be a power of two ≥ 16, got {D}")


@triton.jit
def online_softmax_step(b_q, k_rows, v_rows, i_b, i_h, n0, end, qk_scale, m_i, l_i, a_i, acc,
                         BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr, STATS: tl.constexpr,
                         MASKED: tl.constexpr):
    """One step of a forward's online softmax over keys n0 … n0 + BLOCK_N, which end at `end`: the running max
    m, sum l, argmax a (with STATS) and acc, updated. k_rows, v_rows: `row_blocks` descriptors (TMA loads; rows
    past the tensor come as zeros). MASKED: the step may run past `end` (its scores there count nothing).
    Scores and m in log2 units."""
    b_k = k_rows.load([i_b, n0, i_h, 0]).reshape(BLOCK_N, D)
    b_v = v_rows.load([i_b, n0, i_h, 0]).reshape(BLOCK_N, D)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale  # [BM, BN], log2 units
    if MASKED:
        b_s = tl.where((n0 + tl.arange(0, BLOCK_N))[None, :] < end, b_s, float("-inf"))
    if STATS:
        # Every step holds a valid key (n0 < end), so b_max is finite and the first block sets the argmax.
        b_max, b_arg = tl.max(b_s, 1, return_indices=True)
        # Strict >: on a tie the earlier key keeps the max.
        a_i = tl.where(b_max > m_i, n0 + b_arg, a_i)
    else:
        b_max = tl.max(b_s, 1)
    m_new = tl.maximum(m_i, b_max)
    b_p = tl.exp2(b_s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
    return m_new, l_i, a_i, acc


@triton.jit
def slot_steps(b_q, k_rows, v_rows, i_b, i_h, start, end, qk_scale, m_i, l_i, a_i, acc,
                BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr, STATS: tl.constexpr):
    """The forward over one run of keys of any length [start, end): whole BLOCK_N steps without the key mask,
    then one masked step for the rest (the select on every step cost 5–9% of the hybrid's forward on an H100).
    STATS: track the argmax as well (`online_softmax_step`)."""
    whole = start + (end - start) // BLOCK_N * BLOCK_N
    for n0 in range(start, whole, BLOCK_N):
        m_i, l_i, a_i, acc = online_softmax_step(b_q, k_rows, v_rows, i_b, i_h, n0, end, qk_scale, m_i, l_i, a_i,
                                                  acc, BLOCK_N, D, PRECISION, STATS, False)
    if whole < end:
        m_i, l_i, a_i, acc = online_softmax_step(b_q, k_rows, v_rows, i_b, i_h, whole, end, qk_scale, m_i, l_i,
                                                  a_i, acc, BLOCK_N, D, PRECISION, STATS, True)
    return m_i, l_i, a_i, acc


@triton.jit
def attn_bwd_preprocess_kernel(
    o, do, delta, stride_ob, stride_os, stride_oh, stride_gb, stride_gs, stride_gh, H, S,
    D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m_ok = offs_m < S
    b_o = tl.load(o + i_b.to(tl.int64) * stride_ob + i_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                  mask=m_ok[:, None], other=0.).to(tl.float32)  # [BM, D]
    b_do = tl.load(do + i_b.to(tl.int64) * stride_gb + i_h * stride_gh + offs_m[:, None] * stride_gs + offs_d[None, :],
                   mask=m_ok[:, None], other=0.).to(tl.float32)  # [BM, D]
    tl.store(delta + i_bh.to(tl.int64) * S + offs_m, tl.sum(b_o * b_do, 1), mask=m_ok)


@triton.jit
def dq_ds_rows(b_q, b_do, b_lse, b_delta, b_k, b_v, ok, qk_scale, PRECISION: tl.constexpr):
    """One key step of a query-major backward: queries b_q, b_do [BM, D] with their base-2 lse and delta [BM]
    against keys and values b_k, b_v [BN, D]; pairs not ok count nothing. Returns the score gradient dS [BM, BN],
    unscaled; dq gains dS·K (`dq_rows_step`, which adds the hybrid's normaliser term to dS first)."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [BM, BN]
    # Masking after exp2: a query with no visible key has lse -inf and would give inf - inf.
    b_p = tl.where(ok, tl.exp2(b_s * qk_scale - b_lse[:, None]), 0.)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)  # [BM, BN]
    return b_p * (b_dp - b_delta[:, None])


@triton.jit
def dq_rows_step(b_q, b_do, b_lse, b_delta, k_rows, v_rows, i_b, i_h, n0, end, b_dq, qk_scale,
                  BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
                  b_dc=None, b_a=None):
    """dq's share (unscaled) from keys n0 … n0 + BLOCK_N, loaded through `row_blocks` descriptors; MASKED: the
    step may run past the block's `end`. b_dc, b_a (the hybrids'): each row's gradient of the shared normaliser
    [BM], which goes to the score that set the row's max, at key b_a [BM] (`hybrid.py`'s docstring)."""
    b_k = k_rows.load([i_b, n0, i_h, 0]).reshape(BLOCK_N, D)
    b_v = v_rows.load([i_b, n0, i_h, 0]).reshape(BLOCK_N, D)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        ok = offs_n[None, :] < end
    else:
        ok = tl.full([1, BLOCK_N], 1, tl.int1)
    b_ds = dq_ds_rows(b_q, b_do, b_lse, b_delta, b_k, b_v, ok, qk_scale, PRECISION)
    if b_dc is not None:
        # ok: a masked step's rows past `end` may hold the argmax key of a block visited in another step.
        b_ds += tl.where((offs_n[None, :] == b_a[:, None]) & ok, b_dc[:, None], 0.)
    return tl.dot(b_ds.to(b_k.dtype), b_k, b_dq, input_precision=PRECISION)


@triton.jit
def dq_slot_steps(b_q, b_do, b_lse, b_delta, k_rows, v_rows, i_b, i_h, start, end, b_dq, qk_scale,
                   BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr, b_dc=None, b_a=None):
    """`dq_rows_step` over one key block of any length [start, end), as `slot_steps` walks it."""
    whole = start + (end - start) // BLOCK_N * BLOCK_N
    for n0 in range(start, whole, BLOCK_N):
        b_dq = dq_rows_step(b_q, b_do, b_lse, b_delta, k_rows, v_rows, i_b, i_h, n0, end, b_dq, qk_scale,
                             BLOCK_N, D, PRECISION, False, b_dc, b_a)
    if whole < end:
        b_dq = dq_rows_step(b_q, b_do, b_lse, b_delta, k_rows, v_rows, i_b, i_h, whole, end, b_dq, qk_scale,
                             BLOCK_N, D, PRECISION, True, b_dc, b_a)
    return b_dq


@triton.jit
def key_chunk(k, v, kv_offsets, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, H,
               D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr):
    """What the key-major backward kernels share for their program (chunk of ≤ BLOCK_N keys of key block kb,
    batch·head): the ids, the chunk's key range and offsets, the k/v addresses and their rows [BN, D]."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    kb = i_c // CHUNKS
    kv_end = tl.load(kv_offsets + kb + 1)
    kv_start = tl.load(kv_offsets + kb) + (i_c % CHUNKS) * BLOCK_N
    offs_n = kv_start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < kv_end
    offs_d = tl.arange(0, D)
    k_ptrs = i_b.to(tl.int64) * stride_kb + i_h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = i_b.to(tl.int64) * stride_vb + i_h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]
    b_k = tl.load(k + k_ptrs, mask=n_ok[:, None], other=0.)  # [BN, D]
    b_v = tl.load(v + v_ptrs, mask=n_ok[:, None], other=0.)  # [BN, D]
    return i_bh, i_b, i_h, kb, kv_start, kv_end, offs_n, n_ok, offs_d, k_ptrs, v_ptrs, b_k, b_v


@triton.jit
def dkv_ds(b_k, b_v, b_q, b_do, b_lse, b_delta, ok, b_dv, qk_scale, PRECISION: tl.constexpr):
    """One step of a key-major backward: keys b_k, b_v [BN, D] against query rows b_q, b_do [BM, D] with their
    base-2 lse and delta [BM]; rows with ok False count nothing. Returns the transposed score gradient dSᵀ
    [BN, BM], unscaled, and the accumulated dv; dk gains dSᵀ·Q (`dkv_step`; hybrid adds a term to dSᵀ first)."""
    b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION)  # [BN, BM]
    b_pt = tl.where(ok[None, :], tl.exp2(b_st * qk_scale - b_lse[None, :]), 0.)
    b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, b_dv, input_precision=PRECISION)
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)  # [BN, BM]
    return b_pt * (b_dpt - b_delta[None, :]), b_dv


@triton.jit
def dkv_step(b_k, b_v, b_q, b_do, b_lse, b_delta, ok, b_dk, b_dv, qk_scale, PRECISION: tl.constexpr,
             offs_n=None, b_dc=None, b_a=None):
    """`dkv_ds` and dk's product: returns the accumulated dk (unscaled) and dv. offs_n, b_dc, b_a (a hybrid's):
    the keys' positions [BN] and each query row's normaliser gradient and argmax key [BM], added to dSᵀ where
    the key is the row's argmax (`dq_rows_step`)."""
    b_dst, b_dv = dkv_ds(b_k, b_v, b_q, b_do, b_lse, b_delta, ok, b_dv, qk_scale, PRECISION)
    if b_dc is not None:
        b_dst += tl.where(offs_n[:, None] == b_a[None, :], b_dc[None, :], 0.)
    return tl.dot(b_dst.to(b_q.dtype), b_q, b_dk, input_precision=PRECISION), b_dv


def masked_attention_reference(q, k, v, allowed: torch.Tensor, scale: float | None = None):
    """Softmax attention of q [B, S, H, D] over the keys of k, v [B, S_kv, H, D] that `allowed` [B, H, S, S_kv]
    permits, in fp32 (fp64 for fp64 inputs). Returns out [B, S, H, D] in q's dtype (0 for a query with no
    allowed key) and the natural-log lse [B, H, S] (-inf there), detached."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    s = torch.einsum("bshd,bthd->bhst", q.to(dtype), k.to(dtype)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), 0., m)  # rows with no visible key: exp gives 0 and no NaN
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)
    out = torch.einsum("bhst,bthd->bshd", e / torch.where(l == 0, 1., l), v.to(dtype))
    return out.to(q.dtype), (m + torch.log(l)).squeeze(-1).detach()
