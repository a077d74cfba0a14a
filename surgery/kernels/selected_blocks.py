"""Attention where every query picks its own key blocks (VMoBA), computed key-block-major.

`block_sparse.py` walks query tiles; when neighbouring queries choose unrelated blocks (VMoBA's per-query
selection), a tile must visit the union of their choices and mask the rest, which computes nearly every
pair. Here the work is grouped by key block instead, as MoBA groups it: for each (batch, head, key block)
the queries that chose it are gathered into 64-row chunks, each chunk runs an online softmax over that
block's keys, and every (query, block) pair leaves a partial output and log-sum-exp. A second pass merges
each query's partials by their log-sum-exps. The work is the selected pairs only, plus partial chunks.

Layout: q is [B, S_q, H, D] in any token order; k, v are [B, S_kv, H, D] with key block j = tokens
`kv_offsets[j]:kv_offsets[j + 1]` (`tile_order.to_tile_order` groups them); `block_mask` [B, H, S_q, n]
says which blocks each query attends. Backward: dq per pair into partial rows, then summed per query; that pass
also stores each pair's gathered q, dO, lse and delta rows in key-major pair order, so that dk, dv, key-major
over the queries that chose each block (one program per 64-key chunk, no atomics), load contiguous rows rather
than gathering them every step (2–5% off a layer's forward+backward on an H100). Deterministic.
The per-pair buffers take memory in proportion to the pairs; where they could outgrow PARTIAL_BYTES, heads run
in groups (`head_groups`), each group's buffers freed before the next. The forward and dq load keys and values,
and dk/dv the stored pair rows, through TMA descriptors, and only a block's last step is masked (against pointer
loads with a mask on every step: 7–10% off the op's forward+backward on an H100, bench/NOTES.md "VMoBA").

On GPUs where cuDNN's attention applies, the attention itself goes to cuDNN instead (`PaddedProblems`): every
(batch, key block, head) is one dense problem, the queries that chose the block against the block's keys, its
query rows padded to the longest such list among blocks of that size. cuDNN's forward gives each pair's partial
output and lse, merged per query as above. Its backward, handed each pair's *final* o and lse (gathered per
pair), gives each pair's exact share of dq (summed per query) and dk, dv whole (`cudnn_attention`). Used for
long key blocks (MIN_PADDED_KEYS) while the pairs fill at least MIN_PADDED_FILL of the padded rows; under
`torch.use_deterministic_algorithms` the backward is the Triton passes (cuDNN accumulates dq atomically).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .common import (LN2, LOG2E, attn_bwd_preprocess_kernel, check_qkv, dkv_step, dq_slot_steps, fitted_to_dtype,
                     input_precision, key_chunk, masked_attention_reference, row_blocks, slot_steps)
from .cudnn_attention import cudnn_attention_applies, cudnn_attention_backward, cudnn_attention_forward

# Gathered queries per chunk: the row count of the forward and dq programs.
CHUNK = 64
# The backward's per-pair buffers grow with the pairs (fp32 dq partials and bf16 q, dO rows: 1 KB a pair at
# head_dim 128; 5.6 GB at Wan-1.3B's 3D VMoBA layers): heads run in groups whose buffers fit this (`head_groups`).
PARTIAL_BYTES = 8 * 2**30
# The cuDNN path runs where the longest key block has at least MIN_PADDED_KEYS tokens, while real pairs fill at
# least MIN_PADDED_FILL of its padded rows. Its gathers into padded rows cost per pair, its attention per pair and
# key, and it holds more memory (padded q, dO, o and dq). H100, fwd+bwd against the Triton kernels (bench/NOTES.md,
# "VMoBA"): VMoBA's 1D layers win clearly (4,680-key blocks 14.8 against 17.9 ms at the 1.3B shape; 10,800
# keys at 720p 63.0 against 83.5); 2D layers' 1,365-key blocks break even (1.3B 18.7 against 19.8, 720p 104.1
# against 101.8) at 1.7× the peak memory; 3D layers' 455 keys lose (31.7 against 28.0). The attention alone broke
# even near a fill of 0.63.
MIN_PADDED_KEYS = 2048
MIN_PADDED_FILL = 0.7
# Mask entries (queries × blocks, padded to a power of two) per program of the pair-listing kernels.
LIST_ENTRIES = 4096
# Rows per program of the padding gather.
GATHER_ROWS = 32
# Launch settings, swept at head_dim 128 on an H100 (`bench/variants.py --sweep`, VMoBA 1D layer, 1.3B shape;
# dkv's stages from an A/B over the 1D, 2D and 3D layers with TMA loads, bench/NOTES.md "VMoBA"):
# BLOCK_N keys per step; dkv's BLOCK_M query rows per step.
CONFIGS = {
    "fwd": dict(BLOCK_N=64, num_warps=4, num_stages=3),
    "dq": dict(BLOCK_N=64, num_warps=4, num_stages=2),
    "dkv": dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3),
    "merge": dict(BLOCK_M=64, num_warps=8),
}


@dataclasses.dataclass(frozen=True)
class PairLists:
    """The (query, key block) pairs of a block mask [B, H, S, n], listed both ways.

    Key-major: `pair_query` [P] int32, the query token of each pair, grouped by (b, h, block) group
    g = (b·H + h)·n + j at rows `group_offsets[g]:group_offsets[g + 1]`, ascending tokens within;
    `chunks` [C, 3] int32 (first row, end row, group) cuts each group into ≤ chunk-size runs.
    Query-major: query u = (b·H + h)·S + s owns partial rows `query_offsets[u]:query_offsets[u + 1]`;
    `pair_slot` [P] int32 is the partial row of each key-major pair.
    On the host, per key block: `key_sizes` (its tokens), `block_rows` (its longest chooser list over batch and
    heads) and `block_pairs` (its pairs).
    """

    pair_query: torch.Tensor
    pair_slot: torch.Tensor
    group_offsets: torch.Tensor
    chunks: torch.Tensor
    query_offsets: torch.Tensor
    key_sizes: tuple[int, ...]
    block_rows: tuple[int, ...]
    block_pairs: tuple[int, ...]

    @property
    def pairs(self) -> int:
        return self.pair_query.numel()


def _exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))


@triton.jit
def _chosen(mask, t, bh, H, S, n, stride_b, stride_h, stride_s, ROWS: tl.constexpr, BLOCKS: tl.constexpr):
    """Queries t·ROWS … of row bh = b·H + h of the block mask: their tokens [ROWS], the block ids [BLOCKS], and
    which blocks each query chose, [ROWS, BLOCKS] int32 (0 past S or n)."""
    s = t * ROWS + tl.arange(0, ROWS)
    j = tl.arange(0, BLOCKS)
    ok = (s < S)[:, None] & (j < n)[None, :]
    base = (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    chosen = tl.load(mask + base + s[:, None].to(tl.int64) * stride_s + j[None, :], mask=ok, other=0)
    return s, j, chosen.to(tl.int32)


@triton.jit
def count_pairs_kernel(mask, query_counts, tile_counts, H, S, n, n_tiles, stride_b, stride_h, stride_s,
                       ROWS: tl.constexpr, BLOCKS: tl.constexpr):
    """Per query, the blocks it chose (query_counts [B·H·S]); per (row bh, block j, query tile t), the tile's
    queries that chose j (tile_counts [B·H, n, n_tiles]: in that order one flat scan gives each (group, tile)
    its first key-major pair)."""
    t, bh = tl.program_id(0), tl.program_id(1)
    s, j, chosen = _chosen(mask, t, bh, H, S, n, stride_b, stride_h, stride_s, ROWS, BLOCKS)
    tl.store(query_counts + bh.to(tl.int64) * S + s, tl.sum(chosen, 1), mask=s < S)
    tl.store(tile_counts + (bh.to(tl.int64) * n + j) * n_tiles + t, tl.sum(chosen, 0), mask=j < n)


@triton.jit
def write_pairs_kernel(mask, query_offsets, tile_starts, pair_query, pair_slot, H, S, n, n_tiles, stride_b,
                       stride_h, stride_s, ROWS: tl.constexpr, BLOCKS: tl.constexpr):
    """Each chosen (query, block) pair of the tile: its query token at its key-major row (the (group, tile)'s
    first pair plus its rank among the tile's choosers of the block) and, there too, its query-major partial
    row (the query's first row plus its rank among the query's blocks)."""
    t, bh = tl.program_id(0), tl.program_id(1)
    s, j, chosen = _chosen(mask, t, bh, H, S, n, stride_b, stride_h, stride_s, ROWS, BLOCKS)
    first_row = tl.load(tile_starts + (bh.to(tl.int64) * n + j) * n_tiles + t, mask=j < n, other=0)
    row = first_row[None, :] + tl.cumsum(chosen, 0) - chosen
    first_slot = tl.load(query_offsets + bh.to(tl.int64) * S + s, mask=s < S, other=0)
    slot = first_slot[:, None] + tl.cumsum(chosen, 1) - chosen
    keep = chosen != 0
    tl.store(pair_query + row, tl.broadcast_to(s[:, None], (ROWS, BLOCKS)), mask=keep)
    tl.store(pair_slot + row, slot, mask=keep)


@triton.jit
def chunk_table_kernel(group_offsets, chunk_offsets, chunks, CHUNK_PAIRS, BLOCK: tl.constexpr):
    """Group g's chunks at rows chunk_offsets[g] … of chunks [C, 3]: (first pair, end pair, g), ≤ CHUNK_PAIRS
    pairs each."""
    g = tl.program_id(0)
    first_pair, end_pair = tl.load(group_offsets + g), tl.load(group_offsets + g + 1)
    first_chunk = tl.load(chunk_offsets + g)
    n_chunks = tl.load(chunk_offsets + g + 1) - first_chunk
    for c0 in range(0, n_chunks, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        ok = c < n_chunks
        first = first_pair + c * CHUNK_PAIRS
        row = chunks + (first_chunk + c).to(tl.int64) * 3
        tl.store(row, first, mask=ok)
        tl.store(row + 1, tl.minimum(first + CHUNK_PAIRS, end_pair), mask=ok)
        tl.store(row + 2, tl.full([BLOCK], 0, tl.int32) + g, mask=ok)


def list_pairs(block_mask: torch.Tensor, kv_offsets: torch.Tensor, chunk: int) -> PairLists:
    """`PairLists` of block_mask [B, H, S, n] (bool) over the key blocks of kv_offsets, with key-major chunks of
    ≤ `chunk` pairs. Two Triton passes over the mask (count, then write each pair at both of its places) and a few
    scans and small ops between. One host sync: the pair and chunk counts, with the per-block counts `PairLists`
    keeps. (The PyTorch version, a nonzero over a transposed copy of the mask and a scan over it, took 0.7–1.3 ms
    of an H100 forward at Wan-1.3B's VMoBA layers.)"""
    B, H, S, n = block_mask.shape
    device = block_mask.device
    mask = block_mask if block_mask.stride(-1) == 1 else block_mask.contiguous()
    mask = mask.view(torch.uint8)
    blocks = triton.next_power_of_2(n)
    rows = max(16, LIST_ENTRIES // blocks)
    n_tiles = triton.cdiv(S, rows)
    grid, shape = (n_tiles, B * H), (H, S, n, n_tiles, *mask.stride()[:3])
    query_counts = torch.empty(B * H * S, dtype=torch.int32, device=device)
    tile_counts = torch.empty(B * H, n, n_tiles, dtype=torch.int32, device=device)
    count_pairs_kernel[grid](mask, query_counts, tile_counts, *shape, ROWS=rows, BLOCKS=blocks)
    query_offsets = _exclusive_cumsum(query_counts)
    tile_starts = _exclusive_cumsum(tile_counts.flatten())
    group_offsets = tile_starts[::n_tiles].contiguous()  # [G + 1]: each group's first tile, then the total
    group_counts = group_offsets.diff()
    chunks_per_group = (group_counts + chunk - 1) // chunk
    chunk_offsets = _exclusive_cumsum(chunks_per_group)
    # The chunk table is written before the sync, into rows enough for any mask (ceil(c / chunk) ≤ c / chunk + 1
    # per group): after the sync only the pairs' launch waits on the host, not a dozen small ops.
    groups = B * H * n
    chunks = torch.empty(B * H * S * n // chunk + groups, 3, dtype=torch.int32, device=device)
    chunk_table_kernel[(groups,)](group_offsets, chunk_offsets, chunks, chunk, BLOCK=128)
    per_block = group_counts.view(-1, n).long()
    counts = torch.cat([torch.stack([per_block.sum(), chunk_offsets[-1].long()]), kv_offsets.diff().long(),
                        per_block.amax(0), per_block.sum(0)]).tolist()
    pairs, total = counts[:2]
    key_sizes, block_rows, block_pairs = (tuple(counts[2 + i * n:2 + (i + 1) * n]) for i in range(3))
    pair_query = torch.empty(pairs, dtype=torch.int32, device=device)
    pair_slot = torch.empty(pairs, dtype=torch.int32, device=device)
    write_pairs_kernel[grid](mask, query_offsets, tile_starts, pair_query, pair_slot, *shape, ROWS=rows, BLOCKS=blocks)
    return PairLists(pair_query, pair_slot, group_offsets, chunks[:total], query_offsets, key_sizes, block_rows,
                     block_pairs)


@triton.jit
def gather_rows_kernel(src, index, dst, stride_src, N_SRC, N, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """dst[r] = src[index[r]] for rows of D elements, zeros where index[r] ≥ N_SRC. (torch's `index_select` ran at
    ~1.4 TB/s on these rows on an H100, and padding with it needs a copy of src with a zero row appended.)"""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < N
    source = tl.load(index + rows, mask=ok, other=N_SRC)
    offs_d = tl.arange(0, D)
    values = tl.load(src + source[:, None] * stride_src + offs_d[None, :], mask=(source < N_SRC)[:, None], other=0.)
    tl.store(dst + rows.to(tl.int64)[:, None] * D + offs_d[None, :], values, mask=ok[:, None])


@dataclasses.dataclass(frozen=True)
class KeySizeProblems:
    """The dense problems on the key blocks of one size: one cuDNN call. Problem (b·len(blocks) + i, h) is batch b,
    head h and `blocks[i]`, with `rows` query rows (the longest chooser list) at padded rows `first_row` onward.
    `key_tokens`: the blocks' keys, block after block, or None when `blocks` are all of k's blocks in order
    (k then reshapes into the problems' keys without a copy)."""

    key_size: int
    blocks: list[int]
    rows: int
    first_row: int
    key_tokens: torch.Tensor | None

    def queries(self, padded: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
        """This size's rows of a padded [rows, ...] tensor, as problems [B·len(blocks), H, rows, ...]."""
        count = batch * len(self.blocks) * heads * self.rows
        return padded[self.first_row:self.first_row + count].view(batch * len(self.blocks), heads, self.rows,
                                                                   *padded.shape[1:])

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks' rows of x [B, S_kv, H, D] as the problems' keys [B·len(blocks), H, key_size, D]."""
        B, _, H, D = x.shape
        rows = x if self.key_tokens is None else x[:, self.key_tokens]
        return rows.reshape(B * len(self.blocks), self.key_size, H, D).transpose(1, 2)

    def put_keys(self, dx: torch.Tensor, grad: torch.Tensor) -> None:
        """Writes the problems' key gradients grad [B·len(blocks), H, key_size, D] into dx [B, S_kv, H, D]."""
        B, _, H, D = dx.shape
        rows = grad.transpose(1, 2).reshape(B, len(self.blocks) * self.key_size, H, D)
        if self.key_tokens is None:
            dx.copy_(rows)
        else:
            dx[:, self.key_tokens] = rows.to(dx.dtype)


@dataclasses.dataclass(frozen=True)
class PaddedProblems:
    """The pairs of `PairLists` as dense attention problems for cuDNN, one `KeySizeProblems` per key block size.

    Each (batch, head, key block) is a problem: the queries that chose the block, ascending, then padding rows up
    to the longest such list among blocks of its size, against the block's keys. All sizes' query rows stack into
    one padded [padded_rows, ·] tensor. `query_row` [padded_rows]: the row of each in [B, S, H, ·] tensors seen as
    rows, B·S·H (past the end: zeros) for padding; `value_row`: the same in [B, H, S] tensors;
    `part_row` [P]: the padded row of each query-major pair slot. Padding rows add nothing to dk, dv: their dO
    rows are zero.
    """

    sizes: list[KeySizeProblems]
    query_row: torch.Tensor
    value_row: torch.Tensor
    part_row: torch.Tensor

    @property
    def padded_rows(self) -> int:
        return self.query_row.numel()

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, H, D] (or [B, H, S]) at the padded rows: [padded_rows, D] (or [padded_rows]), zero rows for
        padding."""
        per_value = x.dim() == 3
        # A view where x's strides allow: its row stride need not be D.
        rows = x.reshape(-1, 1) if per_value else x.reshape(-1, x.shape[-1])
        out = torch.empty(self.padded_rows, rows.shape[1], device=x.device, dtype=x.dtype)
        gather_rows_kernel[(triton.cdiv(self.padded_rows, GATHER_ROWS),)](
            rows, self.value_row if per_value else self.query_row, out, rows.stride(0), rows.shape[0],
            self.padded_rows, D=rows.shape[1], BLOCK_M=GATHER_ROWS)
        return out.squeeze(1) if per_value else out


def padded_problems(pairs: PairLists, kv_offsets: torch.Tensor, batch: int, heads: int,
                    tokens: int) -> PaddedProblems:
    """`PairLists` of a [batch, heads, tokens, n] block mask as `PaddedProblems`. No host sync."""
    n = kv_offsets.numel() - 1
    device = kv_offsets.device
    counts = pairs.group_offsets.diff()  # [B·H·n] queries per (b, h, block), key-major like the pairs
    group = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts, output_size=pairs.pairs)
    rank = torch.arange(pairs.pairs, device=device) - pairs.group_offsets[group]
    batch_of, head_of, block_of = group // (heads * n), group // n % heads, group % n
    query = pairs.pair_query.long()
    sizes, first_row = [], 0
    padded_row = torch.empty_like(rank)  # of each key-major pair
    for size, blocks in _blocks_by_size(pairs).items():
        rows = max(pairs.block_rows[b] for b in blocks)
        if rows == 0:  # no query chose these blocks: their dk, dv stay zero
            continue
        if len(blocks) == n:
            pair, index, key_tokens = slice(None), block_of, None
        else:
            ids = torch.tensor(blocks, device=device)
            position = torch.full((n,), -1, device=device).index_put_((ids,), torch.arange(len(blocks), device=device))
            pair = torch.nonzero_static(position[block_of] >= 0, size=sum(pairs.block_pairs[b] for b in blocks))
            pair = pair.squeeze(1)
            index = position[block_of[pair]]
            key_tokens = (kv_offsets[ids].unsqueeze(1) + torch.arange(size, device=device)).flatten()
        problem = batch_of[pair] * len(blocks) + index
        padded_row[pair] = first_row + (problem * heads + head_of[pair]) * rows + rank[pair]
        sizes.append(KeySizeProblems(size, blocks, rows, first_row, key_tokens))
        first_row += batch * len(blocks) * heads * rows
    query_row = torch.full((first_row,), batch * tokens * heads, device=device)
    query_row[padded_row] = (batch_of * tokens + query) * heads + head_of
    value_row = torch.full((first_row,), batch * heads * tokens, device=device)
    value_row[padded_row] = (batch_of * heads + head_of) * tokens + query
    part_row = torch.empty_like(padded_row)
    part_row[pairs.pair_slot.long()] = padded_row
    return PaddedProblems(sizes, query_row, value_row, part_row)


def _blocks_by_size(pairs: PairLists) -> dict[int, list[int]]:
    """The key block ids of each block size, ascending."""
    blocks_of_size: dict[int, list[int]] = {}
    for block, size in enumerate(pairs.key_sizes):
        blocks_of_size.setdefault(size, []).append(block)
    return blocks_of_size


def padded_fill(pairs: PairLists, batch: int, heads: int) -> float:
    """Share of `padded_problems`' query rows that would hold a real pair (1 with no pairs), from the host counts:
    the path is chosen before anything is built."""
    padded = sum(batch * len(blocks) * heads * max(pairs.block_rows[b] for b in blocks)
                 for blocks in _blocks_by_size(pairs).values())
    return pairs.pairs / padded if padded else 1.0


def padded_path_pays(pairs: PairLists, max_kv_block: int, batch: int, heads: int) -> bool:
    """Whether these pairs go to cuDNN as padded problems, where cuDNN applies: key blocks of at least
    MIN_PADDED_KEYS tokens whose real pairs fill at least MIN_PADDED_FILL of the padded rows."""
    return max_kv_block >= MIN_PADDED_KEYS and padded_fill(pairs, batch, heads) >= MIN_PADDED_FILL


@triton.jit
def _dkv_rows_step(b_k, b_v, q_rows, do_rows, lse_rows, delta_rows, r0, end, b_dk, b_dv, qk_scale,
                   BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """dk, dv's shares from pair rows r0 … r0 + BLOCK_M (q, dO through TMA); MASKED: the step may run past the
    key block's last pair row `end`."""
    rows = r0 + tl.arange(0, BLOCK_M)
    b_q = q_rows.load([r0, 0])
    b_do = do_rows.load([r0, 0])
    if MASKED:
        r_ok = rows < end
        b_lse = tl.load(lse_rows + rows, mask=r_ok, other=0.)
        b_delta = tl.load(delta_rows + rows, mask=r_ok, other=0.)
    else:
        r_ok = tl.full([BLOCK_M], 1, tl.int1)
        b_lse = tl.load(lse_rows + rows)
        b_delta = tl.load(delta_rows + rows)
    return dkv_step(b_k, b_v, b_q, b_do, b_lse, b_delta, r_ok, b_dk, b_dv, qk_scale, PRECISION)


@triton.jit
def _gathered_chunk(q, chunks, pair_query, stride_qb, stride_qs, stride_qh, H, NK, D: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """This program's chunk of gathered queries: its pair rows and their validity, batch, head, key block,
    the queries' token ids and their q rows [BM, D]."""
    i_c = tl.program_id(0)
    row_end = tl.load(chunks + 3 * i_c + 1)
    g = tl.load(chunks + 3 * i_c + 2)
    rows = tl.load(chunks + 3 * i_c) + tl.arange(0, BLOCK_M)
    r_ok = rows < row_end
    i_bh, kb = g // NK, g % NK
    i_b, i_h = i_bh // H, i_bh % H
    tokens = tl.load(pair_query + rows, mask=r_ok, other=0)
    offs_d = tl.arange(0, D)
    b_q = tl.load(q + i_b.to(tl.int64) * stride_qb + i_h * stride_qh + tokens[:, None].to(tl.int64) * stride_qs
                  + offs_d[None, :], mask=r_ok[:, None], other=0.)
    return rows, r_ok, i_bh, i_b, i_h, kb, tokens, offs_d, b_q


@triton.jit
def selected_blocks_fwd_kernel(
    q, k_rows, v_rows, o_part, lse_part, chunks, pair_query, pair_slot, kv_offsets, scale,
    stride_qb, stride_qs, stride_qh, H, NK,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program per chunk: its queries against every key of its block, one partial row per pair.
    rows, r_ok, i_bh, i_b, i_h, kb, tokens, offs_d, b_q = _gathered_chunk(
        q, chunks, pair_query, stride_qb, stride_qs, stride_qh, H, NK, D, BLOCK_M)
    qk_scale = scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    no_argmax = tl.zeros([BLOCK_M], tl.int32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    m_i, l_i, no_argmax, acc = slot_steps(b_q, k_rows, v_rows, i_b, i_h, tl.load(kv_offsets + kb).to(tl.int32),
                                           tl.load(kv_offsets + kb + 1).to(tl.int32), qk_scale, m_i, l_i, no_argmax,
                                           acc, BLOCK_N, D, PRECISION, False)
    slots = tl.load(pair_slot + rows, mask=r_ok, other=0).to(tl.int64)
    tl.store(o_part + slots[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(o_part.dtype.element_ty),
             mask=r_ok[:, None])
    tl.store(lse_part + slots, m_i + tl.log2(l_i), mask=r_ok)  # base 2


@triton.jit
def merge_partials_kernel(
    part, lse_part, part_row, query_offsets, out, lse, stride_ob, stride_os, stride_oh, H, S, U,
    D: tl.constexpr, BLOCK_M: tl.constexpr, WEIGHTED: tl.constexpr, INDEXED: tl.constexpr,
):
    """Per query u = (b·H + h)·S + s, its partial rows: weighted by their base-2 lse into out and the natural-log
    lse (WEIGHTED, the forward), or summed into out (dq). Pair slot r's partial is row r of part and lse_part, or
    row part_row[r] (INDEXED)."""
    offs_u = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    u_ok = offs_u < U
    first = tl.load(query_offsets + offs_u, mask=u_ok, other=0)
    count = tl.load(query_offsets + offs_u + 1, mask=u_ok, other=0) - first
    offs_d = tl.arange(0, D)
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for i in range(0, tl.max(count)):
        ok = i < count
        row = (first + i).to(tl.int64)
        if INDEXED:
            row = tl.load(part_row + row, mask=ok, other=0)
        b_part = tl.load(part + row[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.).to(tl.float32)
        if WEIGHTED:
            b_lse = tl.load(lse_part + row, mask=ok, other=float("-inf"))
            m_new = tl.maximum(m_i, b_lse)
            alpha, weight = tl.exp2(m_i - m_new), tl.exp2(b_lse - m_new)
            l_i = l_i * alpha + weight
            acc = acc * alpha[:, None] + b_part * weight[:, None]
            m_i = m_new
        else:
            acc += b_part
    if WEIGHTED:
        acc = acc / tl.where(l_i == 0., 1., l_i)[:, None]
        tl.store(lse + offs_u, (m_i + tl.log2(l_i)) * LN2, mask=u_ok)
    i_bh, i_s = offs_u // S, offs_u % S
    o_rows = (i_bh // H).to(tl.int64) * stride_ob + (i_bh % H) * stride_oh + i_s.to(tl.int64) * stride_os
    tl.store(out + o_rows[:, None] + offs_d[None, :], acc.to(out.dtype.element_ty), mask=u_ok[:, None])


@triton.jit
def selected_blocks_bwd_dq_kernel(
    q, k_rows, v_rows, do, dq_part, lse, delta, q_rows, do_rows, lse_rows, delta_rows, chunks, pair_query, pair_slot,
    kv_offsets, scale,
    stride_qb, stride_qs, stride_qh, stride_gb, stride_gs, stride_gh, H, S, NK,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program per chunk, as the forward: each pair's share of its query's dq, into its partial row. The
    # chunk's gathered q, dO, lse and delta rows are also stored in pair order, for the key-major pass.
    rows, r_ok, i_bh, i_b, i_h, kb, tokens, offs_d, b_q = _gathered_chunk(
        q, chunks, pair_query, stride_qb, stride_qs, stride_qh, H, NK, D, BLOCK_M)
    b_do = tl.load(do + i_b.to(tl.int64) * stride_gb + i_h * stride_gh + tokens[:, None].to(tl.int64) * stride_gs
                   + offs_d[None, :], mask=r_ok[:, None], other=0.)
    b_lse = tl.load(lse + i_bh.to(tl.int64) * S + tokens, mask=r_ok, other=0.) * LOG2E
    b_delta = tl.load(delta + i_bh.to(tl.int64) * S + tokens, mask=r_ok, other=0.)
    pair_rows = rows.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(q_rows + pair_rows, b_q, mask=r_ok[:, None])
    tl.store(do_rows + pair_rows, b_do, mask=r_ok[:, None])
    tl.store(lse_rows + rows, b_lse, mask=r_ok)
    tl.store(delta_rows + rows, b_delta, mask=r_ok)
    qk_scale = scale * LOG2E
    b_dq = tl.zeros([BLOCK_M, D], tl.float32)
    b_dq = dq_slot_steps(b_q, b_do, b_lse, b_delta, k_rows, v_rows, i_b, i_h, tl.load(kv_offsets + kb).to(tl.int32),
                          tl.load(kv_offsets + kb + 1).to(tl.int32), b_dq, qk_scale, BLOCK_N, D, PRECISION)
    slots = tl.load(pair_slot + rows, mask=r_ok, other=0).to(tl.int64)
    tl.store(dq_part + slots[:, None] * D + offs_d[None, :], b_dq * scale, mask=r_ok[:, None])


@triton.jit
def selected_blocks_bwd_dkv_kernel(
    k, v, dk, dv, q_rows, do_rows, lse_rows, delta_rows, group_offsets, kv_offsets, scale,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, H, NK,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program per (chunk of ≤ BLOCK_N keys of key block kb, batch·head), over the queries that chose kb:
    # their rows stored in pair order by the dq pass, so each step loads contiguous rows, not a gather.
    i_bh, i_b, i_h, kb, kv_start, kv_end, offs_n, n_ok, offs_d, k_ptrs, v_ptrs, b_k, b_v = key_chunk(
        k, v, kv_offsets, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, H, D, BLOCK_N, CHUNKS)
    g = i_bh * NK + kb
    lo = tl.load(group_offsets + g)
    # A chunk past the end of a shorter block has no keys: give it an empty walk.
    hi = tl.where(kv_start < kv_end, tl.load(group_offsets + g + 1), lo)
    qk_scale = scale * LOG2E
    b_dk = tl.zeros([BLOCK_N, D], tl.float32)
    b_dv = tl.zeros([BLOCK_N, D], tl.float32)
    whole = lo + (hi - lo) // BLOCK_M * BLOCK_M
    for r0 in range(lo, whole, BLOCK_M):
        b_dk, b_dv = _dkv_rows_step(b_k, b_v, q_rows, do_rows, lse_rows, delta_rows, r0, hi, b_dk, b_dv, qk_scale,
                                    BLOCK_M, PRECISION, False)
    if whole < hi:
        b_dk, b_dv = _dkv_rows_step(b_k, b_v, q_rows, do_rows, lse_rows, delta_rows, whole, hi, b_dk, b_dv, qk_scale,
                                    BLOCK_M, PRECISION, True)
    tl.store(dk + k_ptrs, (b_dk * scale).to(dk.dtype.element_ty), mask=n_ok[:, None])
    tl.store(dv + v_ptrs, b_dv.to(dv.dtype.element_ty), mask=n_ok[:, None])


def _merge(part, lse_part, query_offsets, out, lse, weighted: bool, part_row=None):
    B, S, H, D = out.shape
    config = CONFIGS["merge"]
    merge_partials_kernel[(triton.cdiv(B * H * S, config["BLOCK_M"]),)](
        part, lse_part, query_offsets if part_row is None else part_row, query_offsets, out, lse,
        out.stride(0), out.stride(1), out.stride(2), H, S, B * H * S,
        D=D, WEIGHTED=weighted, INDEXED=part_row is not None, **config,
    )


def selected_blocks_fwd(q, k, v, pairs: PairLists, kv_offsets, scale, o):
    """Writes the output into o (q's shape, any strides); returns lse [B, H, S] fp32."""
    B, S, H, D = q.shape
    NK = kv_offsets.numel() - 1
    config = fitted_to_dtype(CONFIGS["fwd"], q.dtype, halve=("BLOCK_N",))
    # Partial outputs in q's dtype: each is normalised, so rounding it costs what rounding the output does.
    o_part = torch.empty(pairs.pairs, D, device=q.device, dtype=q.dtype)
    lse_part = torch.empty(pairs.pairs, device=q.device, dtype=torch.float32)
    if pairs.pairs:
        k_rows, v_rows = (row_blocks(t, config["BLOCK_N"]) for t in (k, v))
        selected_blocks_fwd_kernel[(pairs.chunks.shape[0],)](
            q, k_rows, v_rows, o_part, lse_part, pairs.chunks, pairs.pair_query, pairs.pair_slot, kv_offsets, scale,
            q.stride(0), q.stride(1), q.stride(2),
            H, NK, D=D, BLOCK_M=CHUNK, PRECISION=input_precision(q.dtype), **config,
        )
    lse = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    _merge(o_part, lse_part, pairs.query_offsets, o, lse, weighted=True)
    return lse


def selected_blocks_bwd(do, q, k, v, o, lse, pairs: PairLists, kv_offsets, max_kv_block, scale, dq, dk, dv):
    """Writes the gradients into dq, dk, dv (shaped and strided like q, k, v)."""
    B, S, H, D = q.shape
    NK = kv_offsets.numel() - 1
    precision = input_precision(q.dtype)
    if not pairs.pairs:  # nothing attended: no gradient (and no rows for the descriptors below)
        for grad in (dq, dk, dv):
            grad.zero_()
        return
    delta = torch.empty_like(lse)
    attn_bwd_preprocess_kernel[(triton.cdiv(S, 64), B * H)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), H, S,
        D=D, BLOCK_M=64,
    )
    dq_part = torch.empty(pairs.pairs, D, device=q.device, dtype=torch.float32)
    # Each pair's q, dO (q's dtype) and base-2 lse, delta (fp32), key-major like the pair lists.
    q_rows, do_rows = (torch.empty(pairs.pairs, D, device=q.device, dtype=q.dtype) for _ in range(2))
    lse_rows, delta_rows = (torch.empty(pairs.pairs, device=q.device, dtype=torch.float32) for _ in range(2))
    config = fitted_to_dtype(CONFIGS["dq"], q.dtype, halve=("BLOCK_N",))
    k_rows, v_rows = (row_blocks(t, config["BLOCK_N"]) for t in (k, v))
    selected_blocks_bwd_dq_kernel[(pairs.chunks.shape[0],)](
        q, k_rows, v_rows, do, dq_part, lse, delta, q_rows, do_rows, lse_rows, delta_rows, pairs.chunks,
        pairs.pair_query, pairs.pair_slot, kv_offsets, scale,
        q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2), H, S, NK,
        D=D, BLOCK_M=CHUNK, PRECISION=precision, **config,
    )
    _merge(dq_part, lse, pairs.query_offsets, dq, lse, weighted=False)
    config = fitted_to_dtype(CONFIGS["dkv"], q.dtype, halve=("BLOCK_M", "BLOCK_N"))
    chunks = triton.cdiv(max_kv_block, config["BLOCK_N"])
    q_pairs, do_pairs = (TensorDescriptor.from_tensor(t, [config["BLOCK_M"], D]) for t in (q_rows, do_rows))
    selected_blocks_bwd_dkv_kernel[(NK * chunks, B * H)](
        k, v, dk, dv, q_pairs, do_pairs, lse_rows, delta_rows, pairs.group_offsets, kv_offsets, scale,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), H, NK,
        D=D, CHUNKS=chunks, PRECISION=precision, **config,
    )


def dense_attention_forward_for(q):
    """The dense attention forward the padded problems go to (`cudnn_attention`), or None for the Triton kernels."""
    return cudnn_attention_forward if cudnn_attention_applies(q, backward=False) else None


def dense_attention_backward_for(q):
    """Its backward, or None for the Triton passes (also in deterministic mode)."""
    return cudnn_attention_backward if cudnn_attention_applies(q, backward=True) else None


def padded_fwd(attention_forward, q, k, v, pairs: PairLists, problems: PaddedProblems, scale, o):
    """`selected_blocks_fwd` with each key size's problems in one `attention_forward(q, k, v, scale) → o, lse`."""
    B, S, H, D = q.shape
    q_padded = problems.padded(q)
    results = [attention_forward(p.queries(q_padded, B, H), p.keys(k), p.keys(v), scale) for p in problems.sizes]
    o_part = _stacked_rows([o for o, _ in results], D)
    lse_part = _stacked_rows([lse for _, lse in results], 1).squeeze(1).float() * LOG2E.value
    lse = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    _merge(o_part, lse_part, pairs.query_offsets, o, lse, weighted=True, part_row=problems.part_row)
    return lse


def padded_bwd(attention_backward, do, q, k, v, o, lse, pairs: PairLists, problems: PaddedProblems, scale,
               dq, dk, dv):
    """`selected_blocks_bwd` through `attention_backward(do, q, k, v, o, lse, scale) → dq, dk, dv` on each key
    size's problems, handed each pair's final o and lse."""
    B, S, H, D = q.shape
    if sum(p.key_size * len(p.blocks) for p in problems.sizes) < k.shape[1]:  # some blocks were chosen by nobody
        dk.zero_()
        dv.zero_()
    do_padded, q_padded, o_padded, lse_padded = (problems.padded(t) for t in (do, q, o, lse))
    dq_parts = []
    for p in problems.sizes:
        dq_part, dk_blocks, dv_blocks = attention_backward(
            *(p.queries(t, B, H) for t in (do_padded, q_padded)), p.keys(k), p.keys(v),
            *(p.queries(t, B, H) for t in (o_padded, lse_padded)), scale)
        dq_parts.append(dq_part)
        p.put_keys(dk, dk_blocks)
        p.put_keys(dv, dv_blocks)
    _merge(_stacked_rows(dq_parts, D), lse, pairs.query_offsets, dq, lse, weighted=False, part_row=problems.part_row)


def _stacked_rows(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    """Problems' results [·, H, rows, width] (or [·, H, rows]) as one [padded_rows, width] tensor, in padded row
    order."""
    rows = [t.reshape(-1, width).contiguous() for t in parts]  # the merge kernel reads rows width apart
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def pair_bytes(head_dim: int, element_size: int) -> int:
    """Backward buffer bytes per (query, block) pair: an fp32 dq partial, q and dO rows, fp32 lse and delta."""
    return head_dim * 4 + 2 * head_dim * element_size + 8


def head_groups(block_mask: torch.Tensor, bytes_per_pair: int) -> list[tuple[int, int]]:
    """Consecutive head ranges [h0, h1) whose per-pair buffers each fit PARTIAL_BYTES: all heads at once unless
    the pairs could outgrow it (a head alone may)."""
    B, H, S, n = block_mask.shape
    if B * H * S * n * bytes_per_pair <= PARTIAL_BYTES:  # even every pair chosen fits: no count, no sync
        return [(0, H)]
    groups, start, size = [], 0, 0
    for h, pairs in enumerate(block_mask.sum(dim=(0, 2, 3)).tolist()):
        if h > start and size + pairs * bytes_per_pair > PARTIAL_BYTES:
            groups.append((start, h))
            start, size = h, 0
        size += pairs * bytes_per_pair
    return groups + [(start, H)]


class SelectedBlockAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_mask, kv_offsets, max_kv_block, scale):
        o = torch.empty_like(q)
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], device=q.device, dtype=torch.float32)
        attention_forward = dense_attention_forward_for(q)
        ctx.groups = []
        for h0, h1 in head_groups(block_mask, pair_bytes(q.shape[-1], q.element_size())):
            pairs = list_pairs(block_mask[:, h0:h1], kv_offsets, CHUNK)
            q_heads, k_heads, v_heads, o_heads = (t[:, :, h0:h1] for t in (q, k, v, o))
            problems = None
            if attention_forward is not None and padded_path_pays(pairs, max_kv_block, q.shape[0], h1 - h0):
                problems = padded_problems(pairs, kv_offsets, q.shape[0], h1 - h0, q.shape[1])
            if problems is None:
                lse[:, h0:h1] = selected_blocks_fwd(q_heads, k_heads, v_heads, pairs, kv_offsets, scale, o_heads)
            else:
                lse[:, h0:h1] = padded_fwd(attention_forward, q_heads, k_heads, v_heads, pairs, problems, scale,
                                           o_heads)
            ctx.groups.append((h0, h1, pairs, problems))
        ctx.save_for_backward(q, k, v, o, lse, kv_offsets)
        ctx.max_kv_block, ctx.scale = max_kv_block, scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, kv_offsets = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        attention_backward = dense_attention_backward_for(q)
        for h0, h1, pairs, problems in ctx.groups:
            heads = [t[:, :, h0:h1] for t in (do, q, k, v, o)]
            grads = [t[:, :, h0:h1] for t in (dq, dk, dv)]
            if problems is not None and attention_backward is not None:
                padded_bwd(attention_backward, *heads, lse[:, h0:h1].contiguous(), pairs, problems, ctx.scale, *grads)
            else:
                selected_blocks_bwd(*heads, lse[:, h0:h1].contiguous(), pairs, kv_offsets, ctx.max_kv_block,
                                    ctx.scale, *grads)
        return dq, dk, dv, None, None, None, None


def _check(q, k, v, block_mask, kv_offsets, max_kv_block):
    check_qkv(q, k, v)
    B, S, H, _ = q.shape
    if block_mask.shape != (B, H, S, kv_offsets.numel() - 1) or block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must be bool [B, H, S, n_kv] = {(B, H, S, kv_offsets.numel() - 1)}, "
                         f"got {block_mask.dtype} {tuple(block_mask.shape)}")
    if max_kv_block < 1:
        raise ValueError(f"max_kv_block must be positive, got {max_kv_block}")


def selected_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    kv_offsets: torch.Tensor,
    max_kv_block: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of each query over the key blocks it chose (Triton, CUDA or interpreter).

    Args:
        q: [B, S, H, D] queries in any token order; fp16, bf16 or fp32. D a power of two ≥ 16.
        k, v: [B, S_kv, H, D] keys and values, block after block; same dtype.
        block_mask: [B, H, S, n_kv] bool, True where query s attends key block j.
        kv_offsets: [n_kv + 1] int32/int64, key block j = tokens kv_offsets[j]:kv_offsets[j + 1]; covers 0..S_kv.
        max_kv_block: an upper bound on key block sizes (tokens).
        scale: softmax scale, default D ** -0.5.

    Returns:
        out [B, S, H, D] (q's dtype; 0 for a query that chose nothing) and lse [B, H, S] fp32, the
        natural-log log-sum-exp of each query's scaled scores (-inf for none; no gradient flows through it).
    """
    _check(q, k, v, block_mask, kv_offsets, max_kv_block)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return SelectedBlockAttentionFunction.apply(q, k, v, block_mask, kv_offsets.contiguous(), int(max_kv_block),
                                                scale)


def selected_block_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    kv_offsets: torch.Tensor,
    max_kv_block: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`selected_block_attention` in plain PyTorch, through a dense [B, H, S, S_kv] mask; same arguments and
    results. Computes in fp32 (or fp64 for fp64 inputs); differentiable in q, k, v."""
    _check(q, k, v, block_mask, kv_offsets, max_kv_block)
    sizes = kv_offsets.diff()
    if int(sizes.max()) > max_kv_block or int(sizes.sum()) != k.shape[1]:
        raise ValueError(f"kv_offsets must cover the {k.shape[1]} keys in blocks of ≤ max_kv_block={max_kv_block}")
    block_of_key = torch.repeat_interleave(torch.arange(sizes.numel(), device=q.device), sizes.long())
    return masked_attention_reference(q, k, v, block_mask[..., block_of_key], scale)


__all__ = ["list_pairs", "selected_block_attention", "selected_block_attention_reference"]
