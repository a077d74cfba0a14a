"""The latent video grid that self-attention runs over, and block layouts of its tokens.

Wan flattens latent patches in raster order: token n = t·H·W + h·W + w over a grid T×H×W.
Sparse variants cut that grid into blocks (VSA's 4×4×4 tiles, VMoBA's frame / patch / cube
blocks); `block_layout` gives the permutation to block-major order once per (grid, block shape).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .errors import SurgeryError

# Wan2.1's VAE compresses 4× in time and 8× in space; the first frame is kept on its own.
VAE_SCALE = (4, 8, 8)


@dataclass(frozen=True)
class VideoGrid:
    """Latent patch grid after patching: frames × height × width tokens."""

    frames: int
    height: int
    width: int

    def __post_init__(self):
        if min(self.frames, self.height, self.width) < 1:
            raise SurgeryError(f"a video grid needs positive sizes, got {self.frames}×{self.height}×{self.width}")

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    def __str__(self) -> str:
        return f"{self.frames}×{self.height}×{self.width}"

    def to_dict(self) -> dict:
        return {"frames": self.frames, "height": self.height, "width": self.width}

    @classmethod
    def from_dict(cls, d: dict) -> "VideoGrid":
        return cls(int(d["frames"]), int(d["height"]), int(d["width"]))


def video_grid(frames: int, height: int, width: int, patch_size=(1, 2, 2), vae_scale=VAE_SCALE) -> VideoGrid:
    """Map a pixel video (frames, height, width) to the transformer's token grid.

    >>> video_grid(81, 480, 832)   # Wan2.1-1.3B: 32,760 tokens
    VideoGrid(frames=21, height=30, width=52)
    """
    st, sh, sw = vae_scale
    pt, ph, pw = patch_size
    if frames < 1 or (frames - 1) % st:
        rule = "positive" if st == 1 else f"{st}k+1 (1, {1 + st}, {1 + 2 * st}, …)"
        raise SurgeryError(f"--frames must be {rule}, got {frames}")
    if height < 1 or height % (sh * ph):
        raise SurgeryError(f"--height must be a positive multiple of {sh * ph}, got {height}")
    if width < 1 or width % (sw * pw):
        raise SurgeryError(f"--width must be a positive multiple of {sw * pw}, got {width}")
    latent_frames = (frames - 1) // st + 1
    if latent_frames % pt:
        raise SurgeryError(f"{latent_frames} latent frames do not divide into temporal patches of {pt}")
    return VideoGrid(latent_frames // pt, height // sh // ph, width // sw // pw)


class ForwardContext:
    """Forward pre-hook on the transformer that records what the current forward's attention needs to know.

    diffusers never tells attention processors the grid or the timestep, so every swapped processor holds this
    shared object and reads it when it runs: `grid`, the patched video grid; `dense`, whether this forward's
    timestep (its largest, for one per token) is at or above `dense_boundary`·1000, where a plan keeps the
    model's own dense attention (the first, highest-noise sampling steps; `surgery.plan.Plan.dense_boundary`).
    """

    def __init__(self, patch_size):
        self.patch_size = tuple(patch_size)
        self.grid: VideoGrid | None = None
        self.dense_boundary: float | None = None
        self.dense = False

    def __call__(self, module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        _, _, frames, height, width = hidden_states.shape
        pt, ph, pw = self.patch_size
        self.grid = VideoGrid(frames // pt, height // ph, width // pw)
        self.dense = False
        if self.dense_boundary is not None:
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            # One host read per forward, as diffusers' Wan2.2 pipelines compare t with their boundary.
            self.dense = float(timestep.max()) >= self.dense_boundary * 1000


@dataclass(frozen=True)
class BlockLayout:
    """Tokens of a grid grouped into blocks of `block` = (bt, bh, bw) tokens, edge blocks partial.

    Blocks are numbered in raster order over block coordinates; inside a block, tokens keep raster order.
    """

    grid: VideoGrid
    block: tuple[int, int, int]
    counts: tuple[int, int, int]  # blocks along t, h, w
    order: torch.Tensor  # [S] raster index of the token at each block-major position
    block_of_token: torch.Tensor  # [S] block id of each raster token
    sizes: torch.Tensor  # [num_blocks] real tokens per block
    offsets: torch.Tensor  # [num_blocks + 1] start of each block in block-major order

    @property
    def num_blocks(self) -> int:
        return self.sizes.numel()

    @property
    def equal_blocks(self) -> bool:
        """Whether every block is whole (the block shape divides the grid), known without reading `sizes`."""
        return all(g % b == 0 for g, b in zip(self.grid.shape, self.block))

    def to(self, device) -> "BlockLayout":
        return block_layout(self.grid, self.block, torch.device(device))


@functools.lru_cache(maxsize=64)
def _layout(grid: VideoGrid, block: tuple[int, int, int], device: torch.device) -> BlockLayout:
    bt, bh, bw = block
    counts = (math.ceil(grid.frames / bt), math.ceil(grid.height / bh), math.ceil(grid.width / bw))
    t = torch.arange(grid.frames).view(-1, 1, 1) // bt
    h = torch.arange(grid.height).view(1, -1, 1) // bh
    w = torch.arange(grid.width).view(1, 1, -1) // bw
    block_of_token = ((t * counts[1] + h) * counts[2] + w).flatten()
    # A stable sort by block id keeps raster order inside each block.
    order = torch.sort(block_of_token, stable=True).indices
    sizes = torch.bincount(block_of_token, minlength=math.prod(counts))
    offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
    return BlockLayout(
        grid, block, counts, order.to(device), block_of_token.to(device), sizes.to(device), offsets.to(device)
    )


def block_layout(grid: VideoGrid, block, device=None) -> BlockLayout:
    """The (cached) block layout of `grid` for blocks of shape `block`, each clipped to the grid."""
    block = tuple(min(int(b), g) for b, g in zip(block, grid.shape))
    if min(block) < 1:
        raise SurgeryError(f"block sizes must be positive, got {block}")
    return _layout(grid, block, torch.device(device or "cpu"))
