"""Block-sparse softmax attention over block-ordered video tokens: VSA's fine stage, chunked long blocks.

Layout (no padding): q, k, v are [B, S, H, D] (diffusers' layout; any strides with a contiguous last
dim, so a [B, H, S, D] tensor goes in as `.transpose(1, 2)` without a copy), with the tokens already
grouped block after block (`tile_order.to_tile_order`). Blocks are ranges given by offsets:

- query tile i is tokens `q_offsets[i]:q_offsets[i + 1]`, at most `max_q_tile` of them;
- key block j is tokens `kv_offsets[j]:kv_offsets[j + 1]`, any length: blocks of at most 128 tokens
  (VSA's 4×4×4 tiles) are one kernel tile each, longer ones (e.g. whole frames) are walked in
  64-token chunks. Partial blocks are masked inside the kernel, so nothing is padded or copied.
  A tile of at most half a kernel tile (VSA's edge tiles: 27% of the 1.3B grid's, of 8–32 tokens) takes
  a half-width step, as a key block in the forward and dq and as a query tile in dk, dv: each list is
  walked long tiles first, then short ones in a loop of its own, so both loops pipeline and a 16-token
  tile costs half a step, not a whole one (~10% off fwd+bwd on random top-k at 75% skipped).

Query tile i of batch b, head h visits the key blocks `kv_block_index[b, h, i, :kv_block_count[b, h, i]]`
(distinct ids, any order), and every query of the tile counts all of them; per-query choices (VMoBA)
are served by `selected_blocks.py`. A query that sees no key gets output 0, log-sum-exp -inf and zero
gradients.

Kernels: the forward runs one program per (query tile, batch·head) with an online softmax in fp32 and
stores the log-sum-exp. Each visited block's token range is gathered first (`listed_ranges`, one small launch),
so the K/V addresses hang on one scalar load rather than a chain of two (16% faster forward).
The backward recomputes the scores in two passes with no atomics, so it is deterministic: a query-major
pass for dq (same walk as the forward) and a key-major pass for dk, dv that walks the transposed map
(for each key block, the query tiles that visit it; built by one sort of the index). That is 7 matmuls
per block pair against 5 for a single pass that adds dq atomically, which measured 1.4–1.6× slower here
(its fp32 reductions: bench/NOTES.md, "Block-sparse op").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (LN2, LOG2E, attn_bwd_preprocess_kernel, check_qkv, dkv_step, dq_rows_step, dq_slot_steps,
                     fitted_to_dtype, input_precision, key_chunk, masked_attention_reference, online_softmax_step,
                     row_blocks, slot_steps)

# Key blocks up to this many tokens are loaded as one tile (the single-loop path); longer ones are chunked.
MAX_FITTED_BLOCK = 128
# Launch settings, swept at head_dim 128 on H100 and H200 (bench/NOTES.md, "Launch settings"). "chunked" (key
# blocks longer than MAX_FITTED_BLOCK, all three kernels) also sets the chunk length BLOCK_N.
CONFIGS = {
    "fwd": dict(num_warps=4, num_stages=3),
    "dq": dict(num_warps=4, num_stages=2),
    "dkv": dict(num_warps=4, num_stages=2),
    "chunked": dict(BLOCK_N=64, num_warps=4, num_stages=2),
}


@triton.jit
def _query_tile(q, kv_count, kv_long, kv_ranges, q_offsets, stride_qb, stride_qs, stride_qh, H, NQ, MAXK,
                D: tl.constexpr, BLOCK_M: tl.constexpr):
    """What the forward and dq kernels share for their program's query tile and batch·head: the ids, the
    tile's token offsets and mask, its queries [BM, D] and the tile's key-block list (token-range base, slot
    count, how many leading slots take full-width steps)."""
    i_q, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    q_end = tl.load(q_offsets + i_q + 1)
    offs_m = tl.load(q_offsets + i_q) + tl.arange(0, BLOCK_M)
    m_ok = offs_m < q_end
    offs_d = tl.arange(0, D)
    b_q = tl.load(q + i_b.to(tl.int64) * stride_qb + i_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                  mask=m_ok[:, None], other=0.)  # [BM, D]
    rng_base = kv_ranges + (i_bh * NQ + i_q).to(tl.int64) * (2 * MAXK)
    n_slots = tl.load(kv_count + i_bh * NQ + i_q)
    n_long = tl.load(kv_long + i_bh * NQ + i_q)
    return i_bh, i_b, i_h, offs_m, m_ok, offs_d, b_q, rng_base, n_slots, n_long


@triton.jit
def block_sparse_attn_fwd_kernel(
    q, k_rows, v_rows, k_half, v_half, o, lse, kv_ranges, kv_count, kv_long, q_offsets, scale,
    lin_num, lin_den, den, amax,
    stride_qb, stride_qs, stride_qh, stride_ob, stride_os, stride_oh, stride_nb, stride_ns, stride_nh,
    H, S, NQ, MAXK,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HALF_N: tl.constexpr, FITTED: tl.constexpr,
    PRECISION: tl.constexpr, HAS_LINEAR: tl.constexpr,
):
    # K/V load through TMA descriptors (`row_blocks`): k_rows, v_rows in BLOCK_N-row steps, k_half, v_half in
    # HALF_N-row ones. Against pointer loads on an H100, −9% at 87.5% and 75% of tiles skipped; the backward
    # kernels, which load the same way, −5 to −7% (bench/NOTES.md "Block-sparse op").
    # HAS_LINEAR (`selected_hybrid.py`): a linear numerator and denominator join the softmax sums under one
    # normaliser; the walk then tracks each row's argmax key, and den and amax are stored for the backward.
    i_bh, i_b, i_h, offs_m, m_ok, offs_d, b_q, rng_base, n_slots, n_long = _query_tile(
        q, kv_count, kv_long, kv_ranges, q_offsets, stride_qb, stride_qs, stride_qh, H, NQ, MAXK, D, BLOCK_M)
    qk_scale = scale * LOG2E

    # A row whose list is empty keeps m = -inf and l = 0: its output is 0 and its lse -inf.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    a_i = tl.zeros([BLOCK_M], tl.int32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if FITTED:
        # Each listed block is one tile of ≤ BLOCK_N keys: flat loops, which Triton pipelines, each step masked
        # to its block's end. Its token range comes straight from kv_ranges: the K/V loads then hang on a
        # single load, not a chain.
        for s in range(0, n_long):
            m_i, l_i, a_i, acc = online_softmax_step(
                b_q, k_rows, v_rows, i_b, i_h, tl.load(rng_base + 2 * s), tl.load(rng_base + 2 * s + 1), qk_scale,
                m_i, l_i, a_i, acc, BLOCK_N, D, PRECISION, HAS_LINEAR, True)
        if HALF_N > 0:
            for s in range(n_long, n_slots):
                m_i, l_i, a_i, acc = online_softmax_step(
                    b_q, k_half, v_half, i_b, i_h, tl.load(rng_base + 2 * s), tl.load(rng_base + 2 * s + 1),
                    qk_scale, m_i, l_i, a_i, acc, HALF_N, D, PRECISION, HAS_LINEAR, True)
    else:
        for s in range(0, n_slots):
            m_i, l_i, a_i, acc = slot_steps(b_q, k_rows, v_rows, i_b, i_h, tl.load(rng_base + 2 * s),
                                             tl.load(rng_base + 2 * s + 1), qk_scale, m_i, l_i, a_i, acc, BLOCK_N,
                                             D, PRECISION, HAS_LINEAR)

    if HAS_LINEAR:
        # m_i is now the row's max score c: the linear terms, in units where that key's weight is 1, join unscaled.
        row = i_bh.to(tl.int64) * S + offs_m
        acc += tl.load(lin_num + i_b.to(tl.int64) * stride_nb + i_h * stride_nh + offs_m[:, None] * stride_ns
                       + offs_d[None, :], mask=m_ok[:, None], other=0.).to(tl.float32)
        l_i += tl.load(lin_den + row, mask=m_ok, other=0.)
        tl.store(den + row, l_i, mask=m_ok)
        tl.store(amax + row, a_i, mask=m_ok)
    acc = acc / tl.where(l_i == 0., 1., l_i)[:, None]
    tl.store(o + i_b.to(tl.int64) * stride_ob + i_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
             acc.to(o.dtype.element_ty), mask=m_ok[:, None])
    tl.store(lse + i_bh.to(tl.int64) * S + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=m_ok)


@triton.jit
def block_sparse_attn_bwd_dq_kernel(
    q, k_rows, v_rows, k_half, v_half, do, dq, lse, delta, kv_ranges, kv_count, kv_long, q_offsets, scale, dc, amax,
    stride_qb, stride_qs, stride_qh, stride_gb, stride_gs, stride_gh, stride_db, stride_ds, stride_dh,
    H, S, NQ, MAXK,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HALF_N: tl.constexpr, FITTED: tl.constexpr,
    PRECISION: tl.constexpr, HAS_LINEAR: tl.constexpr,
):
    # K/V through TMA descriptors, as in the forward. HAS_LINEAR: the shared normaliser's gradient dc goes to
    # each row's argmax key.
    i_bh, i_b, i_h, offs_m, m_ok, offs_d, b_q, rng_base, n_slots, n_long = _query_tile(
        q, kv_count, kv_long, kv_ranges, q_offsets, stride_qb, stride_qs, stride_qh, H, NQ, MAXK, D, BLOCK_M)
    b_do = tl.load(do + i_b.to(tl.int64) * stride_gb + i_h * stride_gh + offs_m[:, None] * stride_gs
                   + offs_d[None, :], mask=m_ok[:, None], other=0.)  # [BM, D]
    b_lse = tl.load(lse + i_bh.to(tl.int64) * S + offs_m, mask=m_ok, other=0.) * LOG2E  # [BM]
    b_delta = tl.load(delta + i_bh.to(tl.int64) * S + offs_m, mask=m_ok, other=0.)  # [BM]
    b_dc = None
    b_a = None
    if HAS_LINEAR:
        b_dc = tl.load(dc + i_bh.to(tl.int64) * S + offs_m, mask=m_ok, other=0.)  # [BM]
        b_a = tl.load(amax + i_bh.to(tl.int64) * S + offs_m, mask=m_ok, other=-1)  # [BM]
    qk_scale = scale * LOG2E

    b_dq = tl.zeros([BLOCK_M, D], tl.float32)
    if FITTED:
        for s in range(0, n_long):
            b_dq = dq_rows_step(b_q, b_do, b_lse, b_delta, k_rows, v_rows, i_b, i_h, tl.load(rng_base + 2 * s),
                                 tl.load(rng_base + 2 * s + 1), b_dq, qk_scale, BLOCK_N, D, PRECISION, True, b_dc, b_a)
        if HALF_N > 0:
            for s in range(n_long, n_slots):
                b_dq = dq_rows_step(b_q, b_do, b_lse, b_delta, k_half, v_half, i_b, i_h, tl.load(rng_base + 2 * s),
                                     tl.load(rng_base + 2 * s + 1), b_dq, qk_scale, HALF_N, D, PRECISION, True, b_dc,
                                     b_a)
    else:
        for s in range(0, n_slots):
            b_dq = dq_slot_steps(b_q, b_do, b_lse, b_delta, k_rows, v_rows, i_b, i_h, tl.load(rng_base + 2 * s),
                                  tl.load(rng_base + 2 * s + 1), b_dq, qk_scale, BLOCK_N, D, PRECISION, b_dc, b_a)
    tl.store(dq + i_b.to(tl.int64) * stride_db + i_h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :],
             (b_dq * scale).to(dq.dtype.element_ty), mask=m_ok[:, None])


@triton.jit
def _dkv_tile_step(rng_base, i, q_rows, do_rows, lse_base, delta_base, i_b, i_h, b_k, b_v, b_dk, b_dv, qk_scale,
                   ROWS: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr, offs_n=None, dc_base=None,
                   amax_base=None):
    """`dkv_step` against listed query tile i (token range at rng_base[2i], rng_base[2i + 1]) in ROWS rows, its
    q and dO through `row_blocks` descriptors (rows past the tile's end count nothing). dc_base, amax_base (with
    the keys' positions offs_n): the rows' normaliser gradients and argmax keys of a hybrid."""
    start = tl.load(rng_base + 2 * i)
    offs_m = start + tl.arange(0, ROWS)
    m_ok = offs_m < tl.load(rng_base + 2 * i + 1)
    b_q = q_rows.load([i_b, start, i_h, 0]).reshape(ROWS, D)
    b_do = do_rows.load([i_b, start, i_h, 0]).reshape(ROWS, D)
    b_lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.) * LOG2E
    b_delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.)
    b_dc = None
    b_a = None
    if dc_base is not None:
        b_dc = tl.load(dc_base + offs_m, mask=m_ok, other=0.)
        b_a = tl.load(amax_base + offs_m, mask=m_ok, other=-1)
    return dkv_step(b_k, b_v, b_q, b_do, b_lse, b_delta, m_ok, b_dk, b_dv, qk_scale, PRECISION, offs_n, b_dc, b_a)


@triton.jit
def block_sparse_attn_bwd_dkv_kernel(
    q_rows, do_rows, q_half, do_half, k, v, dk, dv, lse, delta, q_tile_ptr, q_tile_ranges, kv_offsets, scale,
    dc, amax,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    H, S, NK, L,
    D: tl.constexpr, BLOCK_M: tl.constexpr, HALF_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
    PRECISION: tl.constexpr, HAS_LINEAR: tl.constexpr,
):
    # One program per (chunk of ≤ BLOCK_N keys of key block kb, batch·head); dk, dv are laid out like k, v.
    i_bh, i_b, i_h, kb, kv_start, kv_end, offs_n, n_ok, offs_d, k_ptrs, v_ptrs, b_k, b_v = key_chunk(
        k, v, kv_offsets, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, H, D, BLOCK_N, CHUNKS)
    lse_base = lse + i_bh.to(tl.int64) * S
    delta_base = delta + i_bh.to(tl.int64) * S
    dc_base = None
    amax_base = None
    if HAS_LINEAR:  # the normaliser's gradient, as in the dq kernel
        dc_base = dc + i_bh.to(tl.int64) * S
        amax_base = amax + i_bh.to(tl.int64) * S
    ptr_base = q_tile_ptr + i_bh.to(tl.int64) * (2 * NK + 1) + 2 * kb
    rng_base = q_tile_ranges + i_bh.to(tl.int64) * (2 * L)
    # Visitors of kb: full-width query tiles lo..mid, then the short ones mid..hi (`invert_block_index`).
    lo = tl.load(ptr_base)
    # A chunk past the end of a shorter block has no keys: give it an empty walk.
    has_keys = kv_start < kv_end
    mid = tl.where(has_keys, tl.load(ptr_base + 1), lo)
    hi = tl.where(has_keys, tl.load(ptr_base + 2), lo)
    qk_scale = scale * LOG2E

    b_dk = tl.zeros([BLOCK_N, D], tl.float32)
    b_dv = tl.zeros([BLOCK_N, D], tl.float32)
    # q and dO through TMA descriptors: q_rows, do_rows in BLOCK_M-row tiles, q_half, do_half in HALF_M-row ones.
    for i in range(lo, mid):
        b_dk, b_dv = _dkv_tile_step(rng_base, i, q_rows, do_rows, lse_base, delta_base, i_b, i_h, b_k, b_v, b_dk,
                                    b_dv, qk_scale, BLOCK_M, D, PRECISION, offs_n, dc_base, amax_base)
    if HALF_M > 0:
        for i in range(mid, hi):
            b_dk, b_dv = _dkv_tile_step(rng_base, i, q_half, do_half, lse_base, delta_base, i_b, i_h, b_k, b_v, b_dk,
                                        b_dv, qk_scale, HALF_M, D, PRECISION, offs_n, dc_base, amax_base)
    tl.store(dk + k_ptrs, (b_dk * scale).to(dk.dtype.element_ty), mask=n_ok[:, None])
    tl.store(dv + v_ptrs, b_dv.to(dv.dtype.element_ty), mask=n_ok[:, None])


def _tile(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _half(tile: int) -> int:
    """Width of the half steps of a kernel tile of `tile` rows; 0 (no half steps) where it would be under
    tl.dot's minimum of 16."""
    return tile // 2 if tile >= 32 else 0


def token_ranges(block_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[..., 2] int32 (start, end) token range of each block id; ids out of range (unused slots) are clamped."""
    pairs = torch.stack([offsets[:-1], offsets[1:]], -1).to(torch.int32)  # [n, 2]
    block_ids = block_ids.clamp(0, offsets.numel() - 2)
    return pairs.index_select(0, block_ids.reshape(-1)).view(*block_ids.shape, 2)


@triton.jit
def listed_ranges_kernel(index, count, offsets, ranges, n_long, R, MAXK, n_blocks, SHORT,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Rows ROWS·pid … of the lists (index [R, MAXK], count [R]): each slot's token range written to ranges
    [R, MAXK, 2], the used slots of blocks longer than SHORT first, then the other used ones, each part in list
    order (every used slot counts as long when SHORT is 0); unused slots keep their place. n_long [R]."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < R
    ok = row_ok[:, None] & (cols[None, :] < MAXK)
    ids = tl.load(index + rows[:, None].to(tl.int64) * MAXK + cols[None, :], mask=ok, other=0)
    ids = tl.minimum(tl.maximum(ids, 0), n_blocks - 1)  # unused slots may hold anything
    start = tl.load(offsets + ids, mask=ok, other=0).to(tl.int32)
    end = tl.load(offsets + ids + 1, mask=ok, other=0).to(tl.int32)
    used = ok & (cols[None, :] < tl.load(count + rows, mask=row_ok, other=0)[:, None])
    long = used & ((end - start > SHORT) | (SHORT == 0))
    long_count = tl.sum(long.to(tl.int32), 1)
    short = used & ~long
    slot = tl.where(long, tl.cumsum(long.to(tl.int32), 1) - 1,
                    tl.where(used, long_count[:, None] + tl.cumsum(short.to(tl.int32), 1) - 1, cols[None, :]))
    out = ranges + rows[:, None].to(tl.int64) * (2 * MAXK) + 2 * slot
    tl.store(out, start, mask=ok)
    tl.store(out + 1, end, mask=ok)
    tl.store(n_long + rows, long_count, mask=row_ok)


def listed_ranges(kv_block_index: torch.Tensor, kv_block_count: torch.Tensor, kv_offsets: torch.Tensor,
                  short: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query tile's listed key blocks as token ranges [B, H, NQ, MAXK, 2] int32, the blocks longer than
    `short` tokens first (a stable partition: each part keeps the list's order), and how many of those there
    are, [B, H, NQ] int32. With `short` 0 the lists keep their order and every slot counts as long.
    One Triton launch: the dozen small PyTorch kernels it replaces cost ~0.1 ms of an H100 forward's 2.5 ms."""
    *lead, max_k = kv_block_index.shape
    rows = kv_block_index.numel() // max(max_k, 1)
    ranges = torch.empty(*lead, max_k, 2, dtype=torch.int32, device=kv_block_index.device)
    n_long = torch.empty(lead, dtype=torch.int32, device=kv_block_index.device)
    block = triton.next_power_of_2(max(max_k, 1))
    per_program = max(1, 4096 // block)
    if rows:
        listed_ranges_kernel[(triton.cdiv(rows, per_program),)](
            kv_block_index, kv_block_count, kv_offsets, ranges, n_long, rows, max_k, kv_offsets.numel() - 1, short,
            ROWS=per_program, BLOCK=block)
    return ranges, n_long


def invert_block_index(kv_block_index: torch.Tensor, kv_block_count: torch.Tensor, q_offsets: torch.Tensor,
                       num_kv_blocks: int, short_q_tile: int = 0):
    """The transposed block map, for the key-major backward pass: per (batch, head, key block), the
    query tiles that visit it, those of more than `short_q_tile` tokens first, each part in increasing order.

    kv_block_index: [B, H, NQ, MAXK]; kv_block_count: [B, H, NQ]. Returns `q_tile_ptr` [B·H, 2·n_kv + 1]
    int32 and `q_tile_ranges` [B·H, NQ·MAXK, 2] int32: key block j's visitors are the query tiles
    (token ranges) `q_tile_ranges[bh, q_tile_ptr[bh, 2j]:q_tile_ptr[bh, 2j + 2]]`, the short ones from
    `q_tile_ptr[bh, 2j + 1]` on. One sort, no host sync.
    """
    B, H, NQ, MAXK = kv_block_index.shape
    # Key (block, shortness, tile) as one integer; unused slots sort to the end with block id n_kv.
    dtype = torch.int32 if (2 * num_kv_blocks + 1) * NQ < 2**31 else torch.int64
    short = (q_offsets.diff() <= short_q_tile).to(dtype).view(NQ, 1)
    q_tile = torch.arange(NQ, device=kv_block_index.device, dtype=dtype).view(NQ, 1)
    used = torch.arange(MAXK, device=kv_block_index.device) < kv_block_count[..., None]  # [B, H, NQ, MAXK]
    key = torch.where(used, (2 * kv_block_index.to(dtype) + short) * NQ + q_tile, 2 * num_kv_blocks * NQ)
    key = key.view(B * H, NQ * MAXK).sort(dim=-1).values
    starts = (torch.arange(2 * num_kv_blocks + 1, device=key.device, dtype=dtype) * NQ).expand(B * H, -1).contiguous()
    q_tile_ptr = torch.searchsorted(key, starts, out_int32=True)
    return q_tile_ptr, token_ranges(key % NQ, q_offsets)


def _key_lists(kv_block_index, kv_block_count, kv_offsets, max_kv_block):
    """What the forward and dq kernels walk: whether every key block fits one step (FITTED), the half-step width
    (0 for none), and `listed_ranges`' token ranges and long-slot counts."""
    fitted = max_kv_block <= MAX_FITTED_BLOCK
    half_n = _half(_tile(max_kv_block)) if fitted else 0
    return (fitted, half_n, *listed_ranges(kv_block_index, kv_block_count, kv_offsets, half_n))


def _fitted_configs(kind: str, max_kv_block: int, dtype: torch.dtype) -> dict:
    """Launch settings of `kind` ("fwd", "dq", "dkv") and its key tile BLOCK_N, for inputs of `dtype`."""
    if max_kv_block <= MAX_FITTED_BLOCK:  # BLOCK_N is the key tile: it cannot shrink for fp32
        return fitted_to_dtype(dict(CONFIGS[kind], BLOCK_N=_tile(max_kv_block)), dtype)
    return fitted_to_dtype(CONFIGS["chunked"], dtype, halve=("BLOCK_N",))


def block_sparse_attn_fwd(q, k, v, kv_block_index, kv_block_count, q_offsets, kv_offsets, max_q_tile, max_kv_block,
                          scale, linear=None):
    """o, lse; and with `linear` = (N [B, S, H, D], E [B, H, S] fp32), the terms a hybrid adds to the numerator
    and denominator (`selected_hybrid.py`), also each row's denominator [B, H, S] fp32 and argmax key [B, H, S]
    int32 (else None, None)."""
    B, S, H, D = q.shape
    NQ, MAXK = kv_block_index.shape[-2:]
    fitted, half_n, ranges, n_long = _key_lists(kv_block_index, kv_block_count, kv_offsets, max_kv_block)
    config = _fitted_configs("fwd", max_kv_block, q.dtype)
    o = torch.empty_like(q)
    lse = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    if linear is not None:
        lin_num, lin_den = linear
        den, amax = torch.empty_like(lse), torch.empty(B, H, S, device=q.device, dtype=torch.int32)
    else:  # placeholders the kernel never reads
        lin_num, lin_den, den, amax = o, lse, None, None
    k_rows, v_rows = (row_blocks(t, config["BLOCK_N"]) for t in (k, v))
    k_half, v_half = (row_blocks(t, half_n) for t in (k, v)) if half_n else (k_rows, v_rows)
    block_sparse_attn_fwd_kernel[(NQ, B * H)](
        q, k_rows, v_rows, k_half, v_half, o, lse, ranges, kv_block_count, n_long, q_offsets, scale,
        lin_num, lin_den, lse if den is None else den, lse if amax is None else amax,
        q.stride(0), q.stride(1), q.stride(2), o.stride(0), o.stride(1), o.stride(2),
        lin_num.stride(0), lin_num.stride(1), lin_num.stride(2),
        H, S, NQ, MAXK,
        D=D, BLOCK_M=_tile(max_q_tile), HALF_N=half_n, FITTED=fitted, PRECISION=input_precision(q.dtype),
        HAS_LINEAR=linear is not None, **config,
    )
    return o, lse, den, amax


def block_sparse_attn_bwd(do, q, k, v, o, lse, kv_block_index, kv_block_count, q_offsets, kv_offsets, max_q_tile,
                          max_kv_block, scale, linear=None):
    """dq, dk, dv; and with `linear` = (N, E, den, amax) as the forward took and gave them, the gradients of N and E
    (else None, None)."""
    B, S, H, D = q.shape
    NQ, MAXK = kv_block_index.shape[-2:]
    NK = kv_offsets.numel() - 1
    BLOCK_M = _tile(max_q_tile)
    dq_config, dkv_config = (_fitted_configs(kind, max_kv_block, q.dtype) for kind in ("dq", "dkv"))
    precision = input_precision(q.dtype)

    delta = torch.empty_like(lse)
    attn_bwd_preprocess_kernel[(triton.cdiv(S, 64), B * H)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), H, S,
        D=D, BLOCK_M=64,
    )
    dc, amax, dnum, dden = _normaliser_grads(do, delta, linear) if linear is not None else (lse, lse, None, None)
    has_linear = linear is not None
    dq = torch.empty_like(q)
    # Recomputed rather than saved from the forward: saving costs ~50 MB a layer at 720p.
    fitted, half_n, ranges, n_long = _key_lists(kv_block_index, kv_block_count, kv_offsets, max_kv_block)
    k_rows, v_rows = (row_blocks(t, dq_config["BLOCK_N"]) for t in (k, v))
    k_half, v_half = (row_blocks(t, half_n) for t in (k, v)) if half_n else (k_rows, v_rows)
    block_sparse_attn_bwd_dq_kernel[(NQ, B * H)](
        q, k_rows, v_rows, k_half, v_half, do, dq, lse, delta, ranges, kv_block_count, n_long, q_offsets, scale, dc,
        amax,
        q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        H, S, NQ, MAXK,
        D=D, BLOCK_M=BLOCK_M, HALF_N=half_n, FITTED=fitted, PRECISION=precision, HAS_LINEAR=has_linear, **dq_config,
    )
    half_m = _half(BLOCK_M)
    q_tile_ptr, q_tile_ranges = invert_block_index(kv_block_index, kv_block_count, q_offsets, NK, half_m)
    chunks = triton.cdiv(max_kv_block, dkv_config["BLOCK_N"])
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    q_rows, do_rows = (row_blocks(t, BLOCK_M) for t in (q, do))
    q_half, do_half = (row_blocks(t, half_m) for t in (q, do)) if half_m else (q_rows, do_rows)
    block_sparse_attn_bwd_dkv_kernel[(NK * chunks, B * H)](
        q_rows, do_rows, q_half, do_half, k, v, dk, dv, lse, delta, q_tile_ptr, q_tile_ranges, kv_offsets, scale,
        dc, amax,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        H, S, NK, q_tile_ranges.shape[1],
        D=D, BLOCK_M=BLOCK_M, HALF_M=half_m, CHUNKS=chunks, PRECISION=precision, HAS_LINEAR=has_linear,
        **dkv_config,
    )
    return dq, dk, dv, dnum, dden


def _normaliser_grads(do, delta, linear):
    """For out = (A + N)/(l + E) with A, l in units of exp(s − c) (`selected_hybrid.py`): the gradient of the row max
    c, dc = (do·N − Δ·E)/den [B, H, S] fp32, which the score passes send to the argmax key; the argmax [B, H, S];
    dN = do/den in N's dtype and dE = −Δ/den [B, H, S] fp32, with Δ = rowsum(do∘o)."""
    lin_num, lin_den, den, amax = linear
    inv_den = den.reciprocal()
    dc = (torch.einsum("bshd,bshd->bhs", do.float(), lin_num.float()) - delta * lin_den) * inv_den
    dnum = (do.float() * inv_den.transpose(1, 2).unsqueeze(-1)).to(lin_num.dtype)
    return dc, amax, dnum, -delta * inv_den


class BlockSparseAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv_block_index, kv_block_count, q_offsets, kv_offsets, max_q_tile, max_kv_block, scale):
        o, lse, _, _ = block_sparse_attn_fwd(q, k, v, kv_block_index, kv_block_count, q_offsets, kv_offsets,
                                             max_q_tile, max_kv_block, scale)
        ctx.save_for_backward(q, k, v, o, lse, kv_block_index, kv_block_count, q_offsets, kv_offsets)
        ctx.max_q_tile, ctx.max_kv_block, ctx.scale = max_q_tile, max_kv_block, scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, kv_block_index, kv_block_count, q_offsets, kv_offsets = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv, _, _ = block_sparse_attn_bwd(do, q, k, v, o, lse, kv_block_index, kv_block_count, q_offsets,
                                                 kv_offsets, ctx.max_q_tile, ctx.max_kv_block, ctx.scale)
        return dq, dk, dv, None, None, None, None, None, None, None


def _check(q, k, v, kv_block_index, kv_block_count, q_offsets, kv_offsets, max_q_tile, max_kv_block):
    check_qkv(q, k, v)
    B, _, H, _ = q.shape
    NQ = q_offsets.numel() - 1
    if kv_block_index.dim() != 4 or kv_block_index.shape[:3] != (B, H, NQ) or kv_block_count.shape != (B, H, NQ):
        raise ValueError(f"kv_block_index must be [B, H, NQ, MAXK] and kv_block_count [B, H, NQ] with B={B}, H={H}, "
                         f"NQ={NQ}; got {tuple(kv_block_index.shape)}, {tuple(kv_block_count.shape)}")
    if max_q_tile < 1 or max_kv_block < 1:
        raise ValueError(f"max_q_tile and max_kv_block must be positive, got {max_q_tile}, {max_kv_block}")


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_index: torch.Tensor,
    kv_block_count: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    max_q_tile: int = 64,
    max_kv_block: int = 64,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of each query tile over its listed key blocks only (Triton, CUDA or interpreter).

    Args:
        q: [B, S, H, D] queries, tokens in block order; fp16, bf16 or fp32. D a power of two ≥ 16.
        k, v: [B, S_kv, H, D] keys and values in block order, same dtype.
        kv_block_index: [B, H, NQ, MAXK] int32/int64 key block ids visited by each query tile (distinct).
        kv_block_count: [B, H, NQ] int32/int64, how many leading entries of `kv_block_index` are used.
        q_offsets: [NQ + 1] int32/int64, query tile i = tokens q_offsets[i]:q_offsets[i + 1]; covers 0..S.
        kv_offsets: [n_kv + 1] int32/int64, key block j = tokens kv_offsets[j]:kv_offsets[j + 1]; covers 0..S_kv.
        max_q_tile: an upper bound on query tile sizes (tokens); ≤ 128 is fastest.
        max_kv_block: an upper bound on key block sizes (tokens); ≤ 128 takes the single-loop path.
        scale: softmax scale, default D ** -0.5.

    Returns:
        out [B, S, H, D] (q's dtype and strides) and lse [B, H, S] fp32, the natural-log log-sum-exp of
        each query's scaled scores (no gradient flows through it).
    """
    _check(q, k, v, kv_block_index, kv_block_count, q_offsets, kv_offsets, max_q_tile, max_kv_block)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return BlockSparseAttentionFunction.apply(q, k, v, kv_block_index.contiguous(), kv_block_count.contiguous(),
                                              q_offsets.contiguous(), kv_offsets.contiguous(), int(max_q_tile),
                                              int(max_kv_block), scale)


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_index: torch.Tensor,
    kv_block_count: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    max_q_tile: int = 64,
    max_kv_block: int = 64,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`block_sparse_attention` in plain PyTorch, through a dense [B, H, S, S_kv] mask; same arguments and
    results. Computes in fp32 (or fp64 for fp64 inputs); differentiable in q, k, v."""
    _check(q, k, v, kv_block_index, kv_block_count, q_offsets, kv_offsets, max_q_tile, max_kv_block)
    allowed = listed_blocks_mask(q, k, kv_block_index, kv_block_count, q_offsets, kv_offsets, max_q_tile, max_kv_block)
    return masked_attention_reference(q, k, v, allowed, scale)


def listed_blocks_mask(q, k, kv_block_index, kv_block_count, q_offsets, kv_offsets, max_q_tile, max_kv_block):
    """The dense [B, H, S, S_kv] bool mask of which keys each query visits under the block lists (the references'
    view of `block_sparse_attention`'s arguments), after checking the offsets against the tensors and bounds."""
    B, S, H, _ = q.shape
    NQ, MAXK = kv_block_index.shape[-2:]
    NK = kv_offsets.numel() - 1
    q_sizes, kv_sizes = q_offsets.diff(), kv_offsets.diff()
    if int(q_sizes.max()) > max_q_tile or int(kv_sizes.max()) > max_kv_block:
        raise ValueError(f"tiles of {int(q_sizes.max())} queries or blocks of {int(kv_sizes.max())} keys exceed "
                         f"max_q_tile={max_q_tile} or max_kv_block={max_kv_block}")
    if int(q_sizes.sum()) != S or int(kv_sizes.sum()) != k.shape[1]:
        raise ValueError(f"q_offsets must cover the {S} queries and kv_offsets the {k.shape[1]} keys")
    device = q.device
    tile_of_query = torch.repeat_interleave(torch.arange(NQ, device=device), q_sizes.long())  # [S]
    block_of_key = torch.repeat_interleave(torch.arange(NK, device=device), kv_sizes.long())  # [S_kv]
    used = torch.arange(MAXK, device=device) < kv_block_count[..., None]
    visits = torch.zeros(B, H, NQ, NK + 1, dtype=torch.bool, device=device)
    visits.scatter_(-1, torch.where(used, kv_block_index.long(), NK), True)  # [B, H, NQ, n_kv + 1]
    allowed = visits[:, :, tile_of_query, :NK]  # [B, H, S, n_kv]
    return allowed[..., block_of_key]  # [B, H, S, S_kv]


__all__ = ["block_sparse_attention", "block_sparse_attention_reference", "invert_block_index", "listed_blocks_mask"]
