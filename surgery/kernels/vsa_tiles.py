"""VSA's per-tile stages around the fine kernel, each one pass over the tokens (Triton, fwd and bwd).

- `to_tiles_with_means(x, order, offsets, max_tile)`: raster [B, S, H, D] → the same tokens in tile order
  (what the block-sparse kernel reads) and each tile's mean in fp32 (the coarse stage's input), from one
  read of x. Its backward adds each tile's mean gradient (÷ tile size) to its tokens' gradients and
  writes them back to raster order.
- `gated_coarse_to_raster(fine, gate, coarse, order, offsets, max_tile)`: out = fine + gate ⊙ coarse of
  the token's tile, written in raster order: `fine` is tile-ordered, `gate` raster-ordered, `coarse`
  [B, n, H, D] per tile. Its backward returns the fine gradient in tile order, the gate gradient in
  raster order and the coarse gradient as a per-tile sum in fp32.

- `top_tiles(tile_scores, top_k)`: each query tile's `top_k` best-scoring key tiles (ties to the lower id),
  listed by id: the fine stage's selection without sorting every row (a stable sort of the [B, H, n, n]
  scores took 0.20–0.25 ms at Wan-1.3B's 624 tiles on an H100, bench/NOTES.md "VSA path").

Tile i is tile-order positions `offsets[i]:offsets[i + 1]` (partial tiles are shorter; nothing is
padded) and `order[p]` is the raster token at position p (`grid.block_layout`). One program per
(tile, batch·head) moves the tile's rows; every raster row is written exactly once, so there are no
atomics and no zero fills. Without these, the same math in PyTorch costs fp32 copies, an index_add and
~10 extra passes over [B, S, H, D] per layer (bench/variants.py, BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_program(order, offsets, H, stride_b, stride_s, stride_h, stride_tb, stride_tn, stride_th,
                  D: tl.constexpr, BLOCK_S: tl.constexpr):
    """What the program for (tile, batch·head) addresses: its tokens' offsets [BLOCK_S, D] in a [B, S, H, D]
    tensor in tile order and in raster order, which rows are real tokens [BLOCK_S, 1], the tile's size, and
    the offsets of its row [D] in a per-tile [B, n, H, D] tensor (strides stride_t*)."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    start, end = tl.load(offsets + tile), tl.load(offsets + tile + 1)
    positions = start + tl.arange(0, BLOCK_S)
    valid = positions < end
    rows = tl.load(order + positions, mask=valid, other=0)
    cols = tl.arange(0, D)
    base = b * stride_b + h * stride_h + cols[None, :]
    return (base + positions[:, None] * stride_s, base + rows[:, None] * stride_s, valid[:, None],
            (end - start).to(tl.float32), b * stride_tb + tile * stride_tn + h * stride_th + cols)


@triton.jit
def to_tiles_fwd_kernel(x, tiled, means, order, offsets, H, stride_b, stride_s, stride_h, stride_mb, stride_mn,
                        stride_mh, D: tl.constexpr, BLOCK_S: tl.constexpr):
    in_tiles, in_raster, valid, size, per_tile = _tile_program(
        order, offsets, H, stride_b, stride_s, stride_h, stride_mb, stride_mn, stride_mh, D, BLOCK_S)
    values = tl.load(x + in_raster, mask=valid, other=0.0)
    tl.store(tiled + in_tiles, values, mask=valid)
    tl.store(means + per_tile, tl.sum(values.to(tl.float32), axis=0) / size)


@triton.jit
def to_tiles_bwd_kernel(grad_tiled, grad_means, grad_x, order, offsets, H, stride_b, stride_s, stride_h,
                        stride_mb, stride_mn, stride_mh, D: tl.constexpr, BLOCK_S: tl.constexpr):
    in_tiles, in_raster, valid, size, per_tile = _tile_program(
        order, offsets, H, stride_b, stride_s, stride_h, stride_mb, stride_mn, stride_mh, D, BLOCK_S)
    grad = tl.load(grad_tiled + in_tiles, mask=valid, other=0.0).to(tl.float32)
    grad = grad + tl.load(grad_means + per_tile)[None, :] / size
    tl.store(grad_x + in_raster, grad.to(grad_x.dtype.element_ty), mask=valid)


@triton.jit
def gated_coarse_fwd_kernel(fine, gate, coarse, out, order, offsets, H, stride_b, stride_s, stride_h, stride_cb,
                            stride_cn, stride_ch, D: tl.constexpr, BLOCK_S: tl.constexpr):
    in_tiles, in_raster, valid, _, per_tile = _tile_program(
        order, offsets, H, stride_b, stride_s, stride_h, stride_cb, stride_cn, stride_ch, D, BLOCK_S)
    f = tl.load(fine + in_tiles, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(gate + in_raster, mask=valid, other=0.0).to(tl.float32)
    c = tl.load(coarse + per_tile).to(tl.float32)
    tl.store(out + in_raster, (f + g * c[None, :]).to(out.dtype.element_ty), mask=valid)


@triton.jit
def gated_coarse_bwd_kernel(grad_out, gate, coarse, grad_fine, grad_gate, grad_coarse, order, offsets, H, stride_b,
                            stride_s, stride_h, stride_cb, stride_cn, stride_ch, D: tl.constexpr,
                            BLOCK_S: tl.constexpr):
    in_tiles, in_raster, valid, _, per_tile = _tile_program(
        order, offsets, H, stride_b, stride_s, stride_h, stride_cb, stride_cn, stride_ch, D, BLOCK_S)
    grad = tl.load(grad_out + in_raster, mask=valid, other=0.0)
    g = tl.load(gate + in_raster, mask=valid, other=0.0).to(tl.float32)
    c = tl.load(coarse + per_tile).to(tl.float32)
    tl.store(grad_fine + in_tiles, grad.to(grad_fine.dtype.element_ty), mask=valid)
    grad = grad.to(tl.float32)
    tl.store(grad_gate + in_raster, (grad * c[None, :]).to(grad_gate.dtype.element_ty), mask=valid)
    tl.store(grad_coarse + per_tile, tl.sum(grad * g, axis=0))


@triton.jit
def top_tiles_kernel(scores, out, R, n, k, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Rows ROWS·pid … of scores [R, n] fp32: the k largest of each row (ties to the lower column), their
    columns written in increasing order to out [R, k]. The k-th largest value is found by bisection over
    int32 keys that order like the floats (32 counting passes over the row in registers), not by sorting."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    ok = (rows[:, None] < R) & (cols[None, :] < n)
    x = tl.load(scores + rows[:, None].to(tl.int64) * n + cols[None, :], mask=ok, other=0.)
    x = tl.where(x == 0., 0., x)  # -0.0 ties +0.0, as in a float sort
    bits = x.to(tl.int32, bitcast=True)
    # Negative floats order backwards as integers: flipping their magnitude bits restores the order.
    key = tl.where(ok, tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits), -2147483648).to(tl.int64)
    lo, hi = tl.min(key, 1), tl.max(key, 1)  # the k-th largest key lies in [lo, hi]
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        enough = tl.sum((key >= mid[:, None]).to(tl.int32), 1) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    above = key > lo[:, None]
    tie = key == lo[:, None]
    wanted_ties = k - tl.sum(above.to(tl.int32), 1)
    take = above | (tie & (tl.cumsum(tie.to(tl.int32), 1) <= wanted_ties[:, None]))
    slot = tl.cumsum(take.to(tl.int32), 1) - 1
    tl.store(out + rows[:, None].to(tl.int64) * k + slot, cols[None, :] + tl.zeros_like(slot), mask=take & ok)


def top_tiles(tile_scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """The `top_k` best-scoring key tiles of each query tile, ties to the lower tile id, in increasing id order.

    tile_scores: [..., n] fp32 (VSA's coarse scores [B, H, n, n]). Returns [..., top_k] int32. The same tiles as
    `variants.vsa.select_key_tiles` (a stable descending sort), listed by id instead of by score."""
    n = tile_scores.shape[-1]
    if tile_scores.dtype != torch.float32 or not 1 <= top_k <= n:
        raise ValueError(f"expected fp32 scores and 1 ≤ top_k ≤ {n}, got {tile_scores.dtype} and top_k={top_k}")
    scores = tile_scores.detach().contiguous().view(-1, n)
    out = torch.empty(scores.shape[0], top_k, device=scores.device, dtype=torch.int32)
    block = triton.next_power_of_2(n)
    rows = max(1, 2048 // block)
    top_tiles_kernel[(triton.cdiv(scores.shape[0], rows),)](scores, out, scores.shape[0], n, top_k, ROWS=rows,
                                                            BLOCK=block)
    return out.view(*tile_scores.shape[:-1], top_k)


def _check(*tensors: torch.Tensor):
    """Contiguous [B, S or n, H, D] tensors agreeing on B, H and D, D a power of two ≥ 16."""
    first = tensors[0]
    for t in tensors:
        if t.dim() != 4 or t.shape[0] != first.shape[0] or t.shape[2:] != first.shape[2:]:
            raise ValueError(f"expected [B, S or n, H, D] tensors agreeing on B, H, D; got {tuple(first.shape)} "
                             f"and {tuple(t.shape)}")
    d = first.shape[-1]
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two ≥ 16, got {d}")


def _grid_and_block(x: torch.Tensor, offsets: torch.Tensor, max_tile: int):
    b, _, h, _ = x.shape
    return (offsets.numel() - 1, b * h), max(16, triton.next_power_of_2(max_tile))


class _ToTilesWithMeans(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order, offsets, max_tile):
        x = x.contiguous()
        b, _, h, d = x.shape
        tiled = torch.empty_like(x)
        means = torch.empty(b, offsets.numel() - 1, h, d, device=x.device, dtype=torch.float32)
        grid, block = _grid_and_block(x, offsets, max_tile)
        to_tiles_fwd_kernel[grid](x, tiled, means, order, offsets, h, *x.stride()[:3], *means.stride()[:3], D=d,
                                  BLOCK_S=block)
        ctx.save_for_backward(order, offsets)
        ctx.max_tile = max_tile
        return tiled, means

    @staticmethod
    def backward(ctx, grad_tiled, grad_means):
        order, offsets = ctx.saved_tensors
        grad_tiled, grad_means = grad_tiled.contiguous(), grad_means.float().contiguous()
        grad_x = torch.empty_like(grad_tiled)
        h, d = grad_tiled.shape[2:]
        grid, block = _grid_and_block(grad_tiled, offsets, ctx.max_tile)
        to_tiles_bwd_kernel[grid](grad_tiled, grad_means, grad_x, order, offsets, h, *grad_tiled.stride()[:3],
                                  *grad_means.stride()[:3], D=d, BLOCK_S=block)
        return grad_x, None, None, None


class _GatedCoarseToRaster(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fine, gate, coarse, order, offsets, max_tile):
        fine, gate, coarse = fine.contiguous(), gate.contiguous(), coarse.contiguous()
        out = torch.empty_like(fine)
        h, d = fine.shape[2:]
        grid, block = _grid_and_block(fine, offsets, max_tile)
        gated_coarse_fwd_kernel[grid](fine, gate, coarse, out, order, offsets, h, *fine.stride()[:3],
                                      *coarse.stride()[:3], D=d, BLOCK_S=block)
        ctx.save_for_backward(gate, coarse, order, offsets)
        ctx.max_tile, ctx.fine_dtype = max_tile, fine.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, coarse, order, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_fine = torch.empty_like(grad_out, dtype=ctx.fine_dtype)
        grad_gate = torch.empty_like(gate)
        grad_coarse = torch.empty(coarse.shape, device=coarse.device, dtype=torch.float32)
        h, d = gate.shape[2:]
        grid, block = _grid_and_block(gate, offsets, ctx.max_tile)
        gated_coarse_bwd_kernel[grid](grad_out, gate, coarse, grad_fine, grad_gate, grad_coarse, order, offsets, h,
                                      *gate.stride()[:3], *coarse.stride()[:3], D=d, BLOCK_S=block)
        return grad_fine, grad_gate, grad_coarse.to(coarse.dtype), None, None, None


def to_tiles_with_means(x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                        max_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, S, H, D] raster → (x in tile order [B, S, H, D], tile means [B, n, H, D] fp32); differentiable.

    order: [S] raster token at each tile-order position; offsets: [n + 1] tile starts; max_tile: an
    upper bound on tile sizes (≤ 128 keeps a tile in one program's registers)."""
    _check(x)
    return _ToTilesWithMeans.apply(x, order, offsets, int(max_tile))


def gated_coarse_to_raster(fine: torch.Tensor, gate: torch.Tensor, coarse: torch.Tensor, order: torch.Tensor,
                           offsets: torch.Tensor, max_tile: int) -> torch.Tensor:
    """fine + gate ⊙ coarse[tile of the token], in raster order and fine's dtype; differentiable.

    fine: [B, S, H, D] tile order; gate: [B, S, H, D] raster order; coarse: [B, n, H, D] one row per tile.
    Sums and products run in fp32."""
    _check(fine, gate, coarse)
    return _GatedCoarseToRaster.apply(fine, gate, coarse, order, offsets, int(max_tile))
