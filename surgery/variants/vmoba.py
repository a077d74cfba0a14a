"""`vmoba`: Video Mixture of Block Attention (Wu et al., Kling), for bidirectional video attention.

Keys are partitioned into blocks whose shape cycles with the layer (layer % 3 = 0, 1, 2 → 1D whole
frames, 2D patches spanning all frames, 3D cubes). Each block is represented by its mean key, each
query scores every block by q·k̄ (unscaled), and each query attends exactly (softmax, scale 1/√D)
the tokens of its selected blocks, its own block always among them. Selection is per query
(`topk`) or the paper's global threshold over all (query, block) pairs of a head (`threshold`).

The reference runs in separable steps a kernel can mirror: `block_scores`, then
`select_blocks_topk` / `select_blocks_threshold` (a per-query block mask), then `attend_selected_blocks`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

from ..grid import BlockLayout, VideoGrid, block_layout
from .base import AttentionVariant, VariantConfig
from .block_select import attend_selected_blocks, block_count, compute_dtype, mean_pool_blocks

PARTITIONS = ("1d", "2d", "3d")  # indexed by layer % 3


@dataclasses.dataclass(frozen=True)
class VMoBAConfig(VariantConfig):
    """Partition, block sizes and selection of one layer.

    partition: "1d" | "2d" | "3d" pins the partition; None cycles it with the layer index.
    block_1d: frames per 1D block; block_2d: (height, width) of 2D blocks, which span all frames;
    block_3d: (frames, height, width) of 3D cubes. The defaults are the paper's Wan2.1-1.3B settings
      for 81×480×832 (grid 21×30×52): 7, 24 and 72 equal blocks. Edge blocks on other grids are partial.
    select: "threshold" (global, τ = `threshold`; see `select_blocks_threshold`) or "topk"
      (`top_k` = blocks per query for the 1D, 2D, 3D partitions, own block included; the paper's
      training-free (2, 6, 18); clipped to a grid's block count).
    expected_density: threshold mode's share of attended (query, key) pairs, which depends on the
      data: calibration fills it (`observed_config`), and the cost model refuses to guess without it.
    """

    partition: Literal["1d", "2d", "3d"] | None = None
    block_1d: int = 3
    block_2d: tuple[int, int] = (5, 13)
    block_3d: tuple[int, int, int] = (7, 5, 13)
    select: Literal["threshold", "topk"] = "threshold"
    threshold: float = 0.25
    top_k: tuple[int, int, int] = (2, 6, 18)
    expected_density: float | None = None

    def __post_init__(self):
        sizes = (self.block_1d, *self.block_2d, *self.block_3d)
        if len(self.block_2d) != 2 or len(self.block_3d) != 3 or min(sizes) < 1:
            raise ValueError(f"block sizes must be positive: block_1d={self.block_1d}, "
                             f"block_2d={self.block_2d}, block_3d={self.block_3d}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if len(self.top_k) != 3 or min(self.top_k) < 1:
            raise ValueError(f"top_k must be three counts ≥ 1 (1D, 2D, 3D), got {self.top_k}")
        if self.expected_density is not None and not 0.0 < self.expected_density <= 1.0:
            raise ValueError(f"expected_density must be in (0, 1], got {self.expected_density}")

    def partition_of(self, layer_index: int) -> str:
        return self.partition or PARTITIONS[layer_index % 3]

    def block_shape(self, partition: str, grid: VideoGrid) -> tuple[int, int, int]:
        """Key block shape (frames, height, width) of `partition` on `grid`."""
        if partition == "1d":
            return (self.block_1d, grid.height, grid.width)
        if partition == "2d":
            return (grid.frames, *self.block_2d)
        return self.block_3d

    def blocks_per_query(self, partition: str, num_blocks: int) -> int:
        """Top-k mode's selected blocks per query, own block included."""
        return min(self.top_k[PARTITIONS.index(partition)], num_blocks)


def block_scores(q, k, layout: BlockLayout) -> torch.Tensor:
    """q · (mean key of each block), unscaled. q, k: [B, S, H, D] raster order. Returns [B, H, S, n]."""
    return torch.einsum("bshd,bnhd->bhsn", q, mean_pool_blocks(k, layout))


def select_blocks_topk(scores: torch.Tensor, own_block: torch.Tensor, top_k: int) -> torch.Tensor:
    """Each query's `top_k` best-scoring blocks, its own block always one of them; ties go to the
    lower block id.

    scores: [B, H, S, n]; own_block: [S] block id of each query token. Returns [B, H, S, n] bool.
    """
    own = own_block[:, None] == torch.arange(scores.shape[-1], device=own_block.device)  # [S, n]
    ranked = scores.masked_fill(own, float("inf")).sort(dim=-1, descending=True, stable=True).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, ranked[..., :top_k], True)


def threshold_weights(scores: torch.Tensor, own_block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What threshold selection ranks, per (batch, head): the min-max normalised weights of the non-own pairs,
    with the own-block pairs set to −1, [B, H, S·n] in the scores' dtype; and the own pairs' weight in fp64,
    [B, H, 1]. scores: [B, H, S, n]; own_block: [S] block id of each query token."""
    own = (own_block[:, None] == torch.arange(scores.shape[-1], device=own_block.device)).flatten()  # [S·n]
    flat = scores.flatten(2)  # [B, H, S·n]
    low = flat.amin(dim=-1, keepdim=True)
    span = flat.amax(dim=-1, keepdim=True) - low
    weight = (flat - low) / span.masked_fill(span == 0, 1)
    return weight.masked_fill(own, -1), weight.masked_fill(~own, 0).sum(dim=-1, keepdim=True, dtype=torch.float64)


def select_blocks_threshold(scores: torch.Tensor, own_block: torch.Tensor, threshold: float) -> torch.Tensor:
    """VMoBA's global threshold selection, separately for each (batch, head) over all its S·n
    (query, block) pairs.

    Scores are min-max normalised over those pairs to weights w ∈ [0, 1] (all 0 if every score is
    equal). Pairs are ranked: every query's own-block pair first (always kept, its weight counted
    first), then the others by descending w, ties to the lower (query, block) raster index. A pair is
    kept when the pairs ranked above it hold at most τ of Σw: the kept pairs are the shortest ranked
    prefix whose share reaches τ (up to shares landing exactly on τ). At τ = 1, or with all scores
    equal (Σw = 0), every pair is kept, those of weight 0 included.

    scores: [B, H, S, n]; own_block: [S] block id of each query token. Returns [B, H, S, n] bool.
    """
    weight, own_weight = threshold_weights(scores, own_block)
    # Own-block pairs rank last with weight −1, then add 0: they are kept (and counted) already.
    ranked, order = weight.sort(dim=-1, descending=True, stable=True)
    ranked = ranked.clamp_min(0).double()
    # Running sums per (batch, head) row from one flat scan in fp64, less each row's start: a scan along
    # the last dim of a few long rows runs a handful of GPU blocks (3.5 ms at 1.3B with 3D blocks).
    running = ranked.flatten().cumsum(0).view_as(ranked)
    running = running - (running[..., :1] - ranked[..., :1])  # [B, H, S·n]
    above = own_weight + torch.cat([torch.zeros_like(running[..., :1]), running[..., :-1]], dim=-1)
    # The total comes from the same running sum as `above`, so rounding cannot drop a pair at τ = 1.
    total = own_weight + running[..., -1:]
    keep = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    keep.scatter_(-1, order, above <= threshold * total)
    return (keep | (weight < 0)).view(scores.shape)


def attended_density(block_mask: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Share of (query, key) token pairs a block mask [B, H, S, n] attends, over batch and heads: 0-dim fp64."""
    queries_per_block = block_mask.sum(dim=(0, 1, 2))  # [n]
    pairs = (queries_per_block * layout.sizes).sum()
    return pairs.double() / (block_mask[..., 0].numel() * layout.grid.tokens)


class VideoMixtureOfBlockAttention(AttentionVariant):
    name = "vmoba"
    Config = VMoBAConfig
    plan_candidates = ({"select": "threshold", "threshold": 0.25}, {"select": "threshold", "threshold": 0.5},
                       {"select": "topk"})

    def __init__(self, config: VMoBAConfig, *, heads: int, head_dim: int, dim: int, layer_index: int = 0):
        super().__init__(config, heads=heads, head_dim=head_dim, dim=dim, layer_index=layer_index)
        # Selected densities, kept as tensors so that recording them never waits for the GPU.
        self._last_density: torch.Tensor | None = None
        self._density_sum: torch.Tensor | None = None
        self._density_calls = 0

    @property
    def partition(self) -> str:
        return self.config.partition_of(self.layer_index)

    @property
    def last_density(self) -> float | None:
        """Share of (query, key) pairs attended on the last call (over its batch and heads), or None."""
        return None if self._last_density is None else float(self._last_density)

    def observed_config(self) -> VMoBAConfig:
        """The config with this layer's partition pinned (the cost depends on it) and, in threshold
        mode, expected_density = the mean density selected over the calls seen so far."""
        observed = dataclasses.replace(self.config, partition=self.partition)
        if self.config.select == "threshold" and self._density_calls:
            observed = dataclasses.replace(observed, expected_density=float(self._density_sum) / self._density_calls)
        return observed

    @classmethod
    def _block_counts(cls, config: VMoBAConfig, grid: VideoGrid) -> dict[str, int]:
        """Blocks on `grid` of each partition the config may use; an unpinned config is costed as
        the mean layer of the 1D-2D-3D cycle."""
        partitions = (config.partition,) if config.partition else PARTITIONS
        return {p: block_count(grid, config.block_shape(p, grid)) for p in partitions}

    @classmethod
    def flops(cls, config: VMoBAConfig, grid: VideoGrid, heads: int, head_dim: int) -> float:
        """Per video, with S tokens, n blocks, W = heads·head_dim:

        - mean keys: S·W (block sums and one division per block and channel: S ops per channel);
        - block scores q·k̄: 2·S·n·W;
        - fine attention: 4·W·S²·density (see `density`).
        Without a pinned partition, n and the density are the means over the three partitions.
        Selection (sorting) and softmax are not counted, as in dense attention's count.
        Raises ValueError in threshold mode while expected_density is None.
        """
        tokens, width = grid.tokens, heads * head_dim
        counts = cls._block_counts(config, grid)
        blocks = sum(counts.values()) / len(counts)
        fine = 4 * width * tokens * tokens * cls.density(config, grid)
        return float(tokens * width + 2 * tokens * blocks * width + fine)

    @classmethod
    def density(cls, config: VMoBAConfig, grid: VideoGrid) -> float:
        """Top-k: k/n, assuming the selected blocks have the average size S/n (exact when the block
        shape divides the grid). Threshold: `expected_density`; ValueError while it is None."""
        if config.select == "threshold":
            if config.expected_density is None:
                raise ValueError("vmoba threshold mode has a data-dependent cost: set expected_density "
                                 "(calibration fills it)")
            return config.expected_density
        counts = cls._block_counts(config, grid)
        return math.fsum(config.blocks_per_query(p, n) / n for p, n in counts.items()) / len(counts)

    def select_blocks(self, scores: torch.Tensor, layout: BlockLayout, searched: bool = False) -> torch.Tensor:
        """This layer's selection on block scores [B, H, S, n]: a block mask [B, H, S, n]. searched: threshold
        mode through the sort-free Triton search (`kernels/threshold_select.py`) instead of the spec's sort."""
        if self.config.select == "topk":
            top_k = self.config.blocks_per_query(self.partition, layout.num_blocks)
            return select_blocks_topk(scores, layout.block_of_token, top_k)
        if searched:
            from ..kernels.threshold_select import select_threshold_blocks

            return select_threshold_blocks(scores, layout.block_of_token, self.config.threshold)
        return select_blocks_threshold(scores, layout.block_of_token, self.config.threshold)

    def choose_blocks(self, q, k, grid: VideoGrid, searched: bool = False) -> tuple[torch.Tensor, BlockLayout]:
        """This layer's selection on q, k [B, S, H, D] (raster order; scored in their dtype, no gradient): the
        block mask [B, H, S, n] and the layout of the blocks on `grid`."""
        layout = block_layout(grid, self.config.block_shape(self.partition, grid), q.device)
        with torch.no_grad():
            return self.select_blocks(block_scores(q, k, layout), layout, searched), layout

    def attend_reference(self, q, k, v, grid, x=None):
        """q, k, v: [B, S, H, D] raster order. Returns [B, S, H, D]; records the density selected."""
        out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
        # Autocast would run the matmuls in half precision again; the reference computes in fp32 or wider.
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = (t.to(dtype) for t in (q, k, v))
            block_mask, layout = self.choose_blocks(q, k, grid)
            out = attend_selected_blocks(q, k, v, layout, block_mask)
        self._record_density(block_mask, layout)
        return out.to(out_dtype)

    def attend_kernel(self, q, k, v, grid, x=None):
        """The reference's math with the attention in the Triton kernel of `kernels/selected_blocks.py` (CUDA).

        Scores stay in fp32 PyTorch, as in the reference; threshold mode selects by the sort-free search of
        `kernels/threshold_select.py` (the spec's pairs up to the order of fp64 additions; the 3D layer's
        `choose_blocks` 5.5 → 3.6 ms on an H100). Keys and values go to block order;
        the kernel gathers, for each key block, the queries that chose it, so it computes the selected
        pairs only, however scattered the choices of neighbouring queries are.
        """
        from ..kernels.selected_blocks import selected_block_attention
        from ..kernels.tile_order import tile_permutation, to_tile_order

        with torch.autocast(q.device.type, enabled=False):
            block_mask, layout = self.choose_blocks(q.float(), k.float(), grid, searched=True)  # [B, H, S, n]
        order, inverse = tile_permutation(grid, layout.block, q.device)
        out, _ = selected_block_attention(q, to_tile_order(k, order, inverse), to_tile_order(v, order, inverse),
                                          block_mask, layout.offsets, math.prod(layout.block))
        self._record_density(block_mask, layout)
        return out

    def _record_density(self, block_mask: torch.Tensor, layout: BlockLayout) -> None:
        density = attended_density(block_mask, layout)
        self._last_density = density
        self._density_sum = density if self._density_sum is None else self._density_sum + density
        self._density_calls += 1
