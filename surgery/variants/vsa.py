"""`vsa`: Video Sparse Attention (Zhang et al.; FastVideo), retrofitted with a zero-initialised gate.

The grid is cut into tiles (default 4×4×4 = 64 tokens; edge tiles partial). A coarse stage attends
between tile means; each query tile keeps the top-k key tiles of its coarse scores, and a fine stage
runs exact softmax attention over those tiles only. Output = fine + gate ⊙ coarse, the gate a linear
map of the attention input (FastVideo's `to_gate_compress`: no sigmoid) that starts at zero, so a
retrofitted layer starts at its fine-only output.

The reference runs in three separable steps a kernel can mirror: `coarse_attention` (tile means and
their scores), `select_key_tiles` (per-query-tile lists of key tiles), `attend_selected_blocks`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SurgeryError
from ..grid import BlockLayout, VideoGrid, block_layout
from .base import AttentionVariant, VariantConfig, softmax_scale
from .block_select import attend_selected_blocks, block_count, compute_dtype, mean_pool_blocks


@dataclasses.dataclass(frozen=True)
class TileSelection:
    """Tile shape (frames, height, width) and exactly one of `top_k` (key tiles per query tile) or
    `sparsity` (top_k = clamp(ceil((1 − sparsity)·tiles), 1, tiles), as FastVideo computes it).
    A top_k above a grid's tile count keeps every tile. Shared by the variants that keep each query
    tile's top-k key tiles (`vsa`, `hybrid_selected`)."""

    tile: tuple[int, int, int] = (4, 4, 4)
    top_k: int | None = None
    sparsity: float | None = None

    def __post_init__(self):
        if len(self.tile) != 3 or min(self.tile) < 1:
            raise ValueError(f"tile must be three positive sizes, got {self.tile}")
        if (self.top_k is None) == (self.sparsity is None):
            raise ValueError(f"set exactly one of top_k and sparsity, got top_k={self.top_k}, sparsity={self.sparsity}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be ≥ 1, got {self.top_k}")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")

    def tiles_kept(self, num_tiles: int) -> int:
        """Key tiles each query tile attends in the fine stage, on a grid of `num_tiles` tiles."""
        if self.top_k is not None:
            return min(self.top_k, num_tiles)
        return min(max(math.ceil((1.0 - self.sparsity) * num_tiles), 1), num_tiles)


@dataclasses.dataclass(frozen=True)
class VSAConfig(TileSelection, VariantConfig):
    """`TileSelection`'s settings: VSA has no others."""


def coarse_attention(q_tiles, k_tiles, v_tiles) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention (scale 1/√D) between tile means.

    q_tiles, k_tiles, v_tiles: [B, n, H, D] tile means. Returns the coarse output per tile
    [B, n, H, D] and the tile scores [B, H, n, n] before the softmax (they rank key tiles the same as
    its probabilities, without ties from underflow).
    """
    tile_scores = torch.einsum("bihd,bjhd->bhij", q_tiles, k_tiles) * softmax_scale(q_tiles.shape[-1])
    return torch.einsum("bhij,bjhd->bihd", tile_scores.softmax(dim=-1), v_tiles), tile_scores


def select_key_tiles(tile_scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """The `top_k` best-scoring key tiles of each query tile, best first; ties go to the lower tile id.

    tile_scores: [B, H, n, n]. Returns [B, H, n, top_k] int64 key tile ids (a selection: no gradient).
    """
    return tile_scores.detach().sort(dim=-1, descending=True, stable=True).indices[..., :top_k]


def tile_block_mask(key_tiles: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Key tile lists [B, H, n, k] as the per-query-token block mask [B, H, S, n] of `attend_selected_blocks`."""
    tile_mask = torch.zeros(*key_tiles.shape[:-1], layout.num_blocks, dtype=torch.bool, device=key_tiles.device)
    tile_mask.scatter_(-1, key_tiles, True)  # [B, H, n, n]
    return tile_mask[:, :, layout.block_of_token]


class VideoSparseAttention(AttentionVariant):
    name = "vsa"
    Config = VSAConfig
    plan_candidates = ({"sparsity": 0.5}, {"sparsity": 0.75}, {"sparsity": 0.875})

    def __init__(self, config: VSAConfig, *, heads: int, head_dim: int, dim: int, layer_index: int = 0):
        super().__init__(config, heads=heads, head_dim=head_dim, dim=dim, layer_index=layer_index)
        self.gate_compress = nn.Linear(dim, heads * head_dim)
        # Zero gate: the retrofitted layer starts at its fine-only output; training opens the coarse path.
        nn.init.zeros_(self.gate_compress.weight)
        nn.init.zeros_(self.gate_compress.bias)

    @classmethod
    def flops(cls, config: VSAConfig, grid: VideoGrid, heads: int, head_dim: int) -> float:
        """Per video, with S tokens, n tiles, k = tiles kept, W = heads·head_dim:

        - pooling q, k, v: 3·S·W (tile sums and one division per tile and channel: S ops per channel);
        - coarse attention: 4·H·n²·D (Q̄K̄ᵀ and P̄V̄);
        - fine attention: 4·H·D·S²·k/n, assuming the selected key tiles have the average size S/n
          (exact when the tile shape divides the grid, or when every tile is kept);
        - gate: 2·S·dim·W for the projection, taking dim = W (true of Wan), and 3·S·W for its bias,
          gate ⊙ coarse and the sum with fine.
        Softmax, top-k sorting and broadcasting are not counted, as in dense attention's count.
        """
        tokens, tiles, width = grid.tokens, block_count(grid, config.tile), heads * head_dim
        pooling = 3 * tokens * width
        coarse = 4 * heads * tiles * tiles * head_dim
        fine = 4 * width * tokens * tokens * cls.density(config, grid)
        gate = 2 * tokens * width * width + 3 * tokens * width
        return float(pooling + coarse + fine + gate)

    @classmethod
    def density(cls, config: VSAConfig, grid: VideoGrid) -> float:
        """k/n: the fine stage's share of token pairs, under the average-tile-size assumption of `flops`."""
        tiles = block_count(grid, config.tile)
        return config.tiles_kept(tiles) / tiles

    def attend_kernel(self, q, k, v, grid, x=None):
        """The reference's math with the fine stage in the Triton block-sparse kernel (CUDA).

        One pass per input takes q, k, v to tile order and pools their tile means in fp32
        (`to_tiles_with_means`); one pass adds the gated coarse output to the fine one and goes back
        to raster order (`gated_coarse_to_raster`); nothing is padded. The coarse attention and the
        selection (`top_tiles`: the reference's tiles, listed by id) run in fp32 (n tiles: cheap): ranking
        bf16 scores would reorder near-ties and pick other tiles than the reference.
        """
        from ..kernels.block_sparse import block_sparse_attention
        from ..kernels.tile_order import tile_permutation
        from ..kernels.vsa_tiles import gated_coarse_to_raster, to_tiles_with_means, top_tiles

        if x is None:
            raise SurgeryError("vsa needs the attention input x for its gate")
        layout = block_layout(grid, self.config.tile, q.device)
        order, _ = tile_permutation(grid, layout.block, q.device)
        tile_tokens = math.prod(layout.block)  # an upper bound on every tile's size, known without a sync
        (q, q_tiles), (k, k_tiles), (v, v_tiles) = (
            to_tiles_with_means(t, order, layout.offsets, tile_tokens) for t in (q, k, v))
        with torch.autocast(q.device.type, enabled=False):
            coarse, tile_scores = coarse_attention(q_tiles, k_tiles, v_tiles)  # [B, n, H, D], [B, H, n, n]
        key_tiles = top_tiles(tile_scores, self.config.tiles_kept(layout.num_blocks))  # [B, H, n, k]
        counts = torch.full(key_tiles.shape[:-1], key_tiles.shape[-1], dtype=torch.int32, device=q.device)
        fine, _ = block_sparse_attention(q, k, v, key_tiles, counts, layout.offsets, layout.offsets,
                                         tile_tokens, tile_tokens)
        gate = self.gate_compress(x).unflatten(-1, (self.heads, -1))
        return gated_coarse_to_raster(fine, gate, coarse, order, layout.offsets, tile_tokens)  # [B, S, H, D]

    def attend_reference(self, q, k, v, grid, x=None):
        """q, k, v: [B, S, H, D] raster order; x: [B, S, dim], the gate's input. Returns [B, S, H, D]."""
        if x is None:
            raise SurgeryError("vsa needs the attention input x for its gate")
        out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
        layout = block_layout(grid, self.config.tile, q.device)
        # Autocast would run the matmuls in half precision again; the reference computes in fp32 or wider.
        with torch.autocast(q.device.type, enabled=False):
            q, k, v, x = (t.to(dtype) for t in (q, k, v, x))
            coarse, tile_scores = coarse_attention(*(mean_pool_blocks(t, layout) for t in (q, k, v)))
            key_tiles = select_key_tiles(tile_scores, self.config.tiles_kept(layout.num_blocks))
            fine = attend_selected_blocks(q, k, v, layout, tile_block_mask(key_tiles, layout))  # [B, S, H, D]
            gate = F.linear(x, self.gate_compress.weight.to(dtype), self.gate_compress.bias.to(dtype))
            out = fine + gate.unflatten(-1, (self.heads, -1)) * coarse[:, layout.block_of_token]
        return out.to(out_dtype)
