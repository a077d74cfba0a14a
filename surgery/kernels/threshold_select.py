"""VMoBA's global threshold selection without a sort (Triton, CUDA or interpreter).

`variants.vmoba.select_blocks_threshold` is the spec: per (batch, head), over all S·n (query, block) pairs,
min-max normalised weights w, every query's own-block pair kept and counted first, then the others by
descending w (ties to the lower raster index) while the pairs ranked above hold at most τ of Σw. It sorts
each head's 2.36 M weights at Wan-1.3B's 3D layer (2.30 ms of its 4.55 on an H100, bench/NOTES.md "VMoBA").

The kept non-own pairs are those above a cutoff weight plus the first few ties at it, so the cutoff can be
searched for instead of sorted. With g(t) = own + Σ{w : key ≥ t} (key: the fp32 bits of w, which order like
w since w ≥ 0), the cutoff is c = max{t : g(t) > τ·Σw}: every pair above c is kept, none below, and of the
ties at c as many as fit (they share one weight). `select_threshold_blocks` finds c by a 16-way search over
the 32-bit key range: 8 passes over the weights, each a kernel that sums, per chunk, the weights above 16
candidate cutoffs, and whose last program per row narrows the range. A ninth pass counts the ties at c per
chunk, a tenth writes the mask. On an H100 at Wan-1.3B's 3D layer the passes took 0.21 ms each at 4 warps
(1.7 of `choose_blocks`' 3.6 ms, block scores included; the sort's path took 5.5), 0.19 at 8, 0.15 with 32-bit
compares.

The weights come from one pass over the scores after their min and max (`threshold_weights`, bit for bit the
spec's). Sums are in fp64, as the spec's, each chunk's by `tl.sum` and the chunks' by the row's last program in
chunk order: a fixed order, so the result is the same on every run (no float atomics). Only the order of
addition differs from the spec's prefix sums, so the two can disagree only where τ·Σw lies within fp64 rounding
of a prefix sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

WAYS = 16  # candidate cutoffs per search pass
# The 2^32 keys in 8 passes of 16 ways: pass p steps by 2^(28 − 4p). The fp32 bits of any w in [0, 1] are at
# most ONE_BITS.
SEARCH_PASSES = 8
ONE_BITS = tl.constexpr(0x3F800000)
CHUNK = 4096  # pairs per program
# The search passes at Wan-1.3B's 3D layer on an H100 (8 passes, ms): 4096 pairs × 8 warps 1.50, × 4 warps 1.73;
# 1024 × 2 1.65, × 4 2.00; fewer warps per pair spill (bench/NOTES.md "Launch settings").
SEARCH_WARPS = 8


@triton.jit
def _chunk(weights, row, chunk, N, CHUNK: tl.constexpr):
    """Chunk `chunk` of row `row` of the weights [rows, N] (own pairs −1): its offsets, which pairs are real
    non-own ones, and the weights' keys (fp32 bits; negative for own pairs)."""
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    ok = offs < N
    w = tl.load(weights + row.to(tl.int64) * N + offs, mask=ok, other=-1.)
    return offs, ok, w >= 0, w, w.to(tl.int32, bitcast=True)


@triton.jit
def search_pass_kernel(weights, lo, g_top, total, own, sums, arrived, n_pass, N, n_chunks, threshold,
                       CHUNK: tl.constexpr, WAYS: tl.constexpr, CHUNKS_BLOCK: tl.constexpr):
    """One pass of the search. Each program: Σw of its chunk's non-own pairs with key ≥ lo + j·step, j < WAYS →
    sums [rows, chunks, WAYS] fp64. The row's last program to finish (`arrived` counts them) adds the chunks'
    sums in chunk order, so the result does not depend on which program came last, and narrows the row's range
    to [lo, lo + step): lo and g_top (g at the range's top) updated, and on the first pass total = Σw stored."""
    chunk, row = tl.program_id(0), tl.program_id(1)
    _, _, other, w, key = _chunk(weights, row, chunk, N, CHUNK)
    w = tl.where(other, w, 0.).to(tl.float64)
    lo_row = tl.load(lo + row)
    step = tl.full([], 1, tl.int64) << (28 - 4 * n_pass)  # int64: 15 · 2^28 overflows int32
    ways = tl.arange(0, WAYS)
    above = tl.zeros([WAYS], tl.float64)
    # One [CHUNK] sum per candidate: a [WAYS, CHUNK] fp64 tile would spill, and accumulating [WAYS, 256] tiles
    # over the chunk ran 1.6× slower. Each candidate is clamped to int32 (keys never reach 2^31 − 1) so that the
    # per-pair compares stay 32-bit: 8 passes at the 3D layer 1.47 → 1.23 ms on an H100.
    for j in tl.static_range(WAYS):
        candidate = tl.minimum(lo_row + j * step, 2**31 - 1).to(tl.int32)
        above = tl.where(ways == j, tl.sum(tl.where(key >= candidate, w, 0.)), above)
    row_sums = sums + row.to(tl.int64) * n_chunks * WAYS
    tl.store(row_sums + chunk * WAYS + ways, above)
    # acq_rel: the other programs' sums are visible to the one that arrives last.
    if tl.atomic_add(arrived + row, 1) == n_chunks - 1:
        g = tl.zeros([WAYS], tl.float64)
        for c0 in range(0, n_chunks, CHUNKS_BLOCK):
            c = c0 + tl.arange(0, CHUNKS_BLOCK)
            part = tl.load(row_sums + c[:, None] * WAYS + ways[None, :], mask=(c < n_chunks)[:, None], other=0.)
            g += tl.sum(part, 0)
        g += tl.load(own + row)  # g(lo + j·step)
        if n_pass == 0:
            tl.store(total + row, tl.sum(tl.where(ways == 0, g, 0.)))  # candidate 0 is key 0: every pair
        # The range holds c while g(lo) > limit ≥ g(lo + width): keep the last candidate above the limit (where
        # the own pairs alone exceed τ, g > limit everywhere and c runs to the top: nothing else is kept).
        over = g > threshold * tl.load(total + row)
        last = tl.maximum(tl.sum(over.to(tl.int32)) - 1, 0)
        g_next = tl.sum(tl.where(ways == last + 1, g, 0.))
        tl.store(g_top + row, tl.where(last + 1 < WAYS, g_next, tl.load(g_top + row)))
        tl.store(lo + row, lo_row + last * step)
        tl.store(arrived + row, 0)


@triton.jit
def _cutoff(lo, row):
    """The row's cutoff key c, found by the search (past the weights' range where nothing but own pairs is kept)."""
    return tl.minimum(tl.load(lo + row), 2**31 - 1).to(tl.int32)


@triton.jit
def ties_kernel(weights, lo, g_top, total, ties, ties_kept, arrived, N, n_chunks, threshold,
                CHUNK: tl.constexpr, CHUNKS_BLOCK: tl.constexpr):
    """Each program: how many of its chunk's non-own pairs have key == c → ties [rows, chunks]. The row's last
    program turns those counts into how many ties lie in earlier chunks (in place) and stores how many ties are
    kept: as many as fit under τ·Σw after g(c + 1) = g_top, all of them where they weigh 0."""
    chunk, row = tl.program_id(0), tl.program_id(1)
    _, _, other, _, key = _chunk(weights, row, chunk, N, CHUNK)
    cut = _cutoff(lo, row)
    row_ties = ties + row.to(tl.int64) * n_chunks
    tl.store(row_ties + chunk, tl.sum((other & (key == cut)).to(tl.int32)))
    if tl.atomic_add(arrived + row, 1) == n_chunks - 1:
        before = tl.full([], 0, tl.int32)
        for c0 in range(0, n_chunks, CHUNKS_BLOCK):
            c = c0 + tl.arange(0, CHUNKS_BLOCK)
            count = tl.load(row_ties + c, mask=c < n_chunks, other=0)
            tl.store(row_ties + c, before + tl.cumsum(count, 0) - count, mask=c < n_chunks)
            before += tl.sum(count)
        # room < 0 only where the own pairs alone exceed τ: c then lies above every key and has no ties.
        room = threshold * tl.load(total + row) - tl.load(g_top + row)
        tie_weight = tl.minimum(cut, ONE_BITS).to(tl.float32, bitcast=True).to(tl.float64)
        fit = tl.where(tie_weight > 0, tl.floor(room / tl.where(tie_weight > 0, tie_weight, 1.)) + 1, before)
        tl.store(ties_kept + row, tl.minimum(fit, before).to(tl.int64))
        tl.store(arrived + row, 0)


@triton.jit
def keep_kernel(weights, lo, ties_before, ties_kept, mask, N, n_chunks, CHUNK: tl.constexpr):
    """The mask [rows, N]: own pairs, pairs above the cutoff and the first ties_kept of the ties at it (raster
    order: ties_before [rows, chunks] counts those in earlier chunks). Where τ·Σw reaches Σw (τ = 1, or every
    weight 0) that is every pair with no case of its own: no g exceeds Σw (each is a sum of a subset of g(0) = Σw's
    terms, in the same order, and rounding is monotone), so the cutoff stays at key 0, whose ties weigh 0 and are
    all kept."""
    chunk, row = tl.program_id(0), tl.program_id(1)
    offs, ok, other, _, key = _chunk(weights, row, chunk, N, CHUNK)
    cut = _cutoff(lo, row)
    tied = other & (key == cut)
    rank = tl.load(ties_before + row.to(tl.int64) * n_chunks + chunk) + tl.cumsum(tied.to(tl.int32), 0) - 1
    keep = ~other | (key > cut) | (tied & (rank < tl.load(ties_kept + row)))
    tl.store(mask + row.to(tl.int64) * N + offs, keep, mask=ok)


@triton.jit
def weights_kernel(scores, own_block, low, span, weights, N, n_blocks, CHUNK: tl.constexpr):
    """Chunk of row `row` of the scores [rows, N = S·n]: the weights w = (s − low) / span (rounded division, as
    the spec's), own-block pairs −1."""
    chunk, row = tl.program_id(0), tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    ok = offs < N
    s = tl.load(scores + row.to(tl.int64) * N + offs, mask=ok, other=0.)
    w = tl.div_rn(s - tl.load(low + row), tl.load(span + row))
    own = tl.load(own_block + offs // n_blocks, mask=ok, other=-1) == offs % n_blocks
    tl.store(weights + row.to(tl.int64) * N + offs, tl.where(own, -1., w), mask=ok)


def threshold_weights(scores: torch.Tensor, own_block: torch.Tensor, chunk: int = CHUNK):
    """`vmoba.threshold_weights` (the spec's) in one pass over the scores after their min and max: weights
    [rows = B·H, S·n] fp32, own pairs −1, and the own pairs' weight [rows] fp64. The spec's six elementwise
    passes took 0.9 ms at Wan-1.3B's 3D layer on an H100."""
    if scores.dtype != torch.float32:
        raise ValueError(f"the search ranks fp32 weights: scores must be float32, got {scores.dtype}")
    B, H, S, n = scores.shape
    flat = scores.reshape(B * H, S * n).contiguous()
    low, high = torch.aminmax(flat, dim=-1)
    span = high - low
    span = span.masked_fill(span == 0, 1)
    weights = torch.empty_like(flat)
    weights_kernel[(triton.cdiv(S * n, chunk), B * H)](flat, own_block.contiguous(), low, span, weights, S * n, n,
                                                       CHUNK=chunk)
    own_scores = flat.view(B * H, S, n).gather(-1, own_block.view(1, S, 1).expand(B * H, S, 1)).squeeze(-1)
    return weights, ((own_scores - low[:, None]) / span[:, None]).sum(-1, dtype=torch.float64)


def select_threshold_blocks(scores: torch.Tensor, own_block: torch.Tensor, threshold: float,
                            chunk: int = CHUNK) -> torch.Tensor:
    """`select_blocks_threshold`'s selection, searched rather than sorted: scores [B, H, S, n] and own_block [S]
    (the block id of each query token) as the spec takes them; `chunk` pairs per program (a power of two).
    Returns the block mask [B, H, S, n] bool. Eleven launches after the scores' min and max, no host sync."""
    batch, heads, tokens, blocks = scores.shape
    weights, own = threshold_weights(scores, own_block, chunk)
    rows, N = weights.shape
    device = weights.device
    n_chunks = triton.cdiv(N, chunk)
    grid = (n_chunks, rows)
    sums = torch.empty(rows, n_chunks, WAYS, dtype=torch.float64, device=device)
    arrived = torch.zeros(rows, dtype=torch.int32, device=device)  # each pass's last program sets it back to 0
    lo = torch.zeros(rows, dtype=torch.int64, device=device)
    g_top = own.clone()  # g at the top of the range, above every key
    total = torch.empty_like(own)
    for n_pass in range(SEARCH_PASSES):
        search_pass_kernel[grid](weights, lo, g_top, total, own, sums, arrived, n_pass, N, n_chunks, threshold,
                                 CHUNK=chunk, WAYS=WAYS, CHUNKS_BLOCK=64, num_warps=SEARCH_WARPS)
    # lo = c, g_top = g(c + 1): what the own pairs and the pairs above c hold.
    ties = torch.empty(rows, n_chunks, dtype=torch.int32, device=device)
    ties_kept = torch.empty(rows, dtype=torch.int64, device=device)
    ties_kernel[grid](weights, lo, g_top, total, ties, ties_kept, arrived, N, n_chunks, threshold, CHUNK=chunk,
                      CHUNKS_BLOCK=64)
    mask = torch.empty(rows, N, dtype=torch.bool, device=device)
    keep_kernel[grid](weights, lo, ties, ties_kept, mask, N, n_chunks, CHUNK=chunk)
    return mask.view(batch, heads, tokens, blocks)
