"""`hybrid_selected`: exact softmax over each query tile's top-k key tiles, linear attention over every other key,
under one shared normaliser — `hybrid` (Attention Surgery) with VSA's selection choosing its softmax keys.

The grid is cut into tiles (default 4×4×4, edge tiles partial) as in `vsa`. Query and key tile means score
each other (q̄·k̄/√D) and each query tile keeps its `top_k` best key tiles, K_i for a query i of that tile.
Every query attends to all keys:

    out_i = [Σ_{j∈K_i} exp(s_ij − c_i) v_j + φ_q(q_i)·C_t]  /  [Σ_{j∈K_i} exp(s_ij − c_i) + φ_q(q_i)·C_t[:, D]]

with s_ij = q_i·k_j/√D, c_i = max_{j∈K_i} s_ij and C_t the linear summary of the keys tile t did not select.
As in `hybrid`, the linear term is in units where the largest softmax weight of the row is 1.

Why selected rather than strided softmax keys: a video head's attention mass sits in local neighbourhoods that a
flat stride samples thinly, and a low-degree feature map cannot draw sharp peaks; the coarse tile scores find the
neighbourhoods, exact softmax draws their peaks, and the linear term keeps the long tail (SLA, sparse–linear
attention, makes the same split).

The complement costs about what linear attention costs: per key tile a summary Σ_{j∈tile} φ_k(k_j)ᵀ[v_j, 1]
([M, D+1], M = φ's features); C_t = Σ over all tiles − Σ over tile t's selected ones, the selected sums for
every query tile at once as one [n, n] × [n, M·(D+1)] product with the 0/1 selection matrix (the kernel path,
`kernels/tile_linear.py`, mixes the tile summaries with 1 − the selection in one product instead). No query×key
matrix: per query only φ_q(q_i)·C_t. Nor in the softmax branch: the reference scores each query tile against
its gathered selected key tiles ([B, H, n, T, k·T]), the kernel path walks them (`kernels/selected_hybrid.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from ..grid import BlockLayout, VideoGrid, block_layout
from .base import softmax_scale
from .block_select import block_count, mean_pool_blocks
from .feature_maps import FeatureMapAttention, FeatureMapConfig, feature_map_flops, promoted
from .vsa import TileSelection, select_key_tiles


@dataclasses.dataclass(frozen=True)
class HybridSelectedConfig(TileSelection, FeatureMapConfig):
    """`TileSelection`'s tile shape and exactly one of top_k or sparsity (which key tiles get exact softmax), and
    `FeatureMapConfig`'s feature-map sizes (the linear term over the rest)."""

    def __post_init__(self):
        TileSelection.__post_init__(self)
        FeatureMapConfig.__post_init__(self)


class _TileSlots(torch.autograd.Function):
    """x [B, S, ...] → [B, n·T, ...], each tile's tokens in its T slots and zeros after them (pad), or back
    (unpad). The two are each other's adjoint, so each backward is the other's gather, not a scatter-add."""

    @staticmethod
    def forward(ctx, x, index, inverse, pad):
        ctx.save_for_backward(index, inverse)
        ctx.pad = pad
        return _gather(x, index, pad)

    @staticmethod
    def backward(ctx, grad):
        index, inverse = ctx.saved_tensors
        return _gather(grad, inverse, not ctx.pad), None, None, None


def _gather(x, index, pad):
    if pad:  # the row past the tokens is the zero that the slots after a partial tile read
        x = torch.cat([x, x.new_zeros(x.shape[0], 1, *x.shape[2:])], 1)
    return x.index_select(1, index)


@functools.lru_cache(maxsize=64)
def _tile_slots(grid: VideoGrid, tile: tuple[int, int, int], device: torch.device, tile_order: bool):
    """(source [n·T]: the token in each slot, S for an empty one; slot [S]: each token's slot) for tokens in tile
    order or raster order."""
    layout = block_layout(grid, tile, device)
    tokens, slots_per_tile = grid.tokens, math.prod(layout.block)
    position = torch.arange(tokens, device=device)
    tile_of_position = torch.repeat_interleave(torch.arange(layout.num_blocks, device=device), layout.sizes)
    slot = tile_of_position * slots_per_tile + position - layout.offsets[tile_of_position]
    token = position if tile_order else layout.order
    source = torch.full((layout.num_blocks * slots_per_tile,), tokens, device=device)
    source[slot] = token
    slot_of_token = torch.empty_like(position)
    slot_of_token[token] = slot
    return source, slot_of_token


def _by_tile(x, layout: BlockLayout, tile_order: bool):
    """[B, S, ...] (raster or tile order) → [B, n, T, ...], each tile's tokens then zeros (`_TileSlots`)."""
    source, slot_of_token = _tile_slots(layout.grid, layout.block, x.device, tile_order)
    return _TileSlots.apply(x, source, slot_of_token, True).unflatten(1, (layout.num_blocks, -1))


def _from_tiles(x, layout: BlockLayout, tile_order: bool):
    """[B, n, T, ...] → [B, S, ...], the inverse of `_by_tile` (the empty slots dropped)."""
    source, slot_of_token = _tile_slots(layout.grid, layout.block, x.device, tile_order)
    return _TileSlots.apply(x.flatten(1, 2), slot_of_token, source, False)


def selected_softmax_sums(q, k, v, key_tiles, layout: BlockLayout):
    """The softmax branch in units where each row's largest weight is 1: Σ_{j∈K_i} exp(s_ij − c_i) v_j [B, S, H, D]
    and Σ_{j∈K_i} exp(s_ij − c_i) [B, S, H], for q, k, v [B, S, H, D] in raster order and the key tile lists
    [B, H, n, k]. Each query tile scores only its k selected key tiles: [B, H, n, T, k·T] scores, never [S, S]."""
    q_tiles, k_tiles, v_tiles = (_by_tile(t, layout, False).permute(0, 3, 1, 2, 4) for t in (q, k, v))
    # [B, H, n, T, D]
    batch, heads = q.shape[0], q.shape[2]
    b = torch.arange(batch, device=q.device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=q.device).view(1, -1, 1, 1)
    k_selected, v_selected = (t[b, h, key_tiles].flatten(3, 4) for t in (k_tiles, v_tiles))  # [B, H, n, k·T, D]
    source, _ = _tile_slots(layout.grid, layout.block, q.device, False)
    real = (source < layout.grid.tokens).view(layout.num_blocks, -1)[key_tiles].flatten(3)  # [B, H, n, k·T]
    scores = torch.einsum("bhitd,bhiud->bhitu", q_tiles, k_selected) * softmax_scale(q.shape[-1])
    scores = scores.masked_fill(~real.unsqueeze(3), float("-inf"))  # the empty slots of partial tiles
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp()  # [B, H, n, T, k·T]
    numerator = torch.einsum("bhitu,bhiud->bithd", weights, v_selected)  # [B, n, T, H, D]
    return _from_tiles(numerator, layout, False), _from_tiles(weights.sum(-1).permute(0, 2, 3, 1), layout, False)


def complement_sums(phi_q, phi_k, v, selected, layout: BlockLayout, tile_order: bool):
    """The linear term over each query's unselected keys: numerator [B, S, H, D] and denominator [B, S, H].

    phi_q, phi_k: [B, S, H, M]; v: [B, S, H, D]; all in raster order, or in tile order with `tile_order`;
    selected: [B, H, n, n] 0/1 in their dtype, query tile × key tile. Computes in the inputs' dtype. The
    numerator's and denominator's sums stay apart: rows of D + 1 would put the matmuls on unaligned rows.
    """
    def unselected(tile_sums):  # [B, H, n, ...] per key tile → per query tile: all tiles' sum − the selected ones'
        flat = tile_sums.flatten(3)
        return (flat.sum(2, keepdim=True) - selected @ flat).view_as(tile_sums)

    phi_k_tiles, phi_q_tiles = _by_tile(phi_k, layout, tile_order), _by_tile(phi_q, layout, tile_order)
    # [B, n, T, H, M]. Each key tile's Σφ_k(k)ᵀv [B, H, n, M, D] and Σφ_k(k) [B, H, n, M]:
    tile_numerators = torch.einsum("bnthf,bnthd->bhnfd", phi_k_tiles, _by_tile(v, layout, tile_order))
    tile_denominators = phi_k_tiles.sum(2).transpose(1, 2)
    numerator = torch.einsum("bnthf,bhnfd->bnthd", phi_q_tiles, unselected(tile_numerators))
    denominator = torch.einsum("bnthf,bhnf->bnth", phi_q_tiles, unselected(tile_denominators))
    return _from_tiles(numerator, layout, tile_order), _from_tiles(denominator, layout, tile_order)


def selection_matrix(key_tiles: torch.Tensor, num_tiles: int, dtype: torch.dtype) -> torch.Tensor:
    """Key tile lists [B, H, n, k] as the 0/1 matrix [B, H, n, n] (query tile × key tile) in `dtype`."""
    selected = torch.zeros(*key_tiles.shape[:-1], num_tiles, dtype=dtype, device=key_tiles.device)
    return selected.scatter_(-1, key_tiles.long(), 1.0)


class HybridSelectedAttention(FeatureMapAttention):
    name = "hybrid_selected"
    Config = HybridSelectedConfig
    plan_candidates = ({"sparsity": 0.5}, {"sparsity": 0.75}, {"sparsity": 0.875})

    @classmethod
    def flops(cls, config: HybridSelectedConfig, grid: VideoGrid, heads: int, head_dim: int) -> float:
        """Per video, with S tokens, n tiles, k = tiles kept, W = heads·head_dim, h = hidden_dim, ψ of width F'
        and φ of M features (`psi_width`, `feature_count`: F and 2F, or P·F for the polynomial), e = M·(D+1):

        - pooling q and k: 2·S·W; tile scores Q̄K̄ᵀ: 2·H·n²·D;
        - softmax over the selected tiles: 4·W·S²·k/n (the average tile size, as `vsa` assumes);
        - when k < n, the linear term: φ_q and φ_k over S tokens each (`feature_map_flops`), the tile summaries
          φ(K)ᵀ[V, 1] 2·H·S·e, the selected tiles' sums 2·H·n²·e (one product with the 0/1 selection matrix) and
          φ_q·C 2·H·S·e; the ones column counted as the matmul column it stands for (the code sums Σφ(k) apart).
        Softmax, top-k, the exponentials and the final division are not counted, as in dense attention's count.
        """
        tokens, tiles, width = grid.tokens, block_count(grid, config.tile), heads * head_dim
        kept = config.tiles_kept(tiles)
        selection = 2 * tokens * width + 2 * heads * tiles * tiles * head_dim
        softmax_branch = 4 * width * tokens * tokens * kept / tiles
        if kept == tiles:
            return float(selection + softmax_branch)
        summary = config.feature_count(head_dim) * (head_dim + 1)
        maps = feature_map_flops(2 * tokens, heads, head_dim, config.psi_width(head_dim), config.hidden_dim)
        linear_branch = maps + 2 * heads * summary * (2 * tokens + tiles * tiles)
        return float(selection + softmax_branch + linear_branch)

    @classmethod
    def density(cls, config: HybridSelectedConfig, grid: VideoGrid) -> float:
        """k/n: the softmax branch's share of token pairs, under the average-tile-size assumption of `flops`."""
        tiles = block_count(grid, config.tile)
        return config.tiles_kept(tiles) / tiles

    def attend_reference(self, q, k, v, grid, x=None):
        """q, k, v: [B, S, H, D] in raster order. Computes in fp32 (fp64 stays). Returns [B, S, H, D] in q's dtype."""
        layout = block_layout(grid, self.config.tile, q.device)
        kept = self.config.tiles_kept(layout.num_blocks)
        # Autocast would run the matmuls in half precision again.
        with torch.autocast(q.device.type, enabled=False):
            q32, k32, v32 = promoted(q, k, v)
            q_tiles, k_tiles = mean_pool_blocks(q32, layout), mean_pool_blocks(k32, layout)
            tile_scores = torch.einsum("bihd,bjhd->bhij", q_tiles, k_tiles) * softmax_scale(q.shape[-1])
            key_tiles = select_key_tiles(tile_scores, kept)  # [B, H, n, k]
            numerator, denominator = selected_softmax_sums(q32, k32, v32, key_tiles, layout)
            if kept < layout.num_blocks:
                selected = selection_matrix(key_tiles, layout.num_blocks, q32.dtype)
                linear_numerator, linear_denominator = complement_sums(
                    self.feature_map_q(q32), self.feature_map_k(k32), v32, selected, layout, tile_order=False)
                numerator = numerator + linear_numerator
                denominator = denominator + linear_denominator
        return (numerator / denominator.unsqueeze(-1)).to(q.dtype)

    def attend_kernel(self, q, k, v, grid, x=None):
        """The reference's math in Triton ops (CUDA): q, k, v go to tile order pooling their tile means in one pass
        each (`to_tiles_with_means`, as `vsa`), the selection runs in fp32 (`top_tiles`, the reference's tiles), the
        linear term over the unselected tiles in `kernels/tile_linear.py` (φ inside its kernels, per-tile summaries
        mixed by one batched matmul with 1 − the selection) and the softmax branch with it in
        `kernels/selected_hybrid.py` (block-sparse over the selected tiles). A map those kernels do not compute
        (a second layer, the polynomial) goes through `complement_sums` in q's dtype instead."""
        from ..kernels.block_sparse import block_sparse_attention
        from ..kernels.selected_hybrid import selected_hybrid_attention
        from ..kernels.tile_linear import tile_mixed_linear_terms
        from ..kernels.tile_order import tile_permutation, to_raster_order, to_tile_order
        from ..kernels.vsa_tiles import to_tiles_with_means, top_tiles

        layout = block_layout(grid, self.config.tile, q.device)
        order, inverse = tile_permutation(grid, layout.block, q.device)
        tile_tokens = math.prod(layout.block)  # an upper bound on every tile's size, known without a sync
        scale = softmax_scale(q.shape[-1])
        (q, q_tiles), (k, k_tiles) = (to_tiles_with_means(t, order, layout.offsets, tile_tokens) for t in (q, k))
        v = to_tile_order(v, order, inverse)
        with torch.autocast(q.device.type, enabled=False):
            tile_scores = torch.einsum("bihd,bjhd->bhij", q_tiles, k_tiles) * scale  # fp32
            kept = self.config.tiles_kept(layout.num_blocks)
            key_tiles = top_tiles(tile_scores, kept)  # [B, H, n, k]
            counts = torch.full(key_tiles.shape[:-1], kept, dtype=torch.int32, device=q.device)
            blocks = (key_tiles, counts, layout.offsets, layout.offsets, tile_tokens, tile_tokens, scale)
            if kept == layout.num_blocks:  # no linear keys: full attention
                return to_raster_order(block_sparse_attention(q, k, v, *blocks)[0], order, inverse)
            selected = selection_matrix(key_tiles, layout.num_blocks, q.dtype)
            params = self.fused_map_parameters(q)
            if params is not None:
                linear_numerator, linear_denominator = tile_mixed_linear_terms(
                    q, k, v, *params, 1 - selected, layout.offsets, tile_tokens)
            else:
                linear_numerator, linear_denominator = complement_sums(
                    self.feature_map_q.forward_kernel(q), self.feature_map_k.forward_kernel(k), v, selected, layout,
                    tile_order=True)
                linear_denominator = linear_denominator.transpose(1, 2)
            out = selected_hybrid_attention(q, k, v, linear_numerator, linear_denominator, *blocks)
        return to_raster_order(out, order, inverse)  # [B, S, H, D]
