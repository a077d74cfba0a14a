"""What a model is and where its FLOPs go: the numbers behind `vsurgery info`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .grid import VideoGrid
from .loading import load_config
from .model import default_text_tokens, resolve_grid
from .variants import dense_attention_flops
from .wan import fingerprint


def forward_flops(config: dict, grid: VideoGrid, text_tokens: int) -> dict[str, float]:
    """Matmul FLOPs of one transformer forward for one video, by part (norms and elementwise ops left out)."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    tokens, layers = grid.tokens, config["num_layers"]
    patch = math.prod(config["patch_size"])
    self_attention = dense_attention_flops(tokens, config["num_attention_heads"], config["attention_head_dim"])
    per_block = {
        "self_attention_projections": 2 * tokens * dim * dim * 4,  # q, k, v, out
        "cross_attention_projections": 2 * (2 * tokens + 2 * text_tokens) * dim * dim,  # q, out; k, v on text
        "cross_attention": 4 * tokens * text_tokens * dim,
        "ffn": 2 * 2 * tokens * dim * config["ffn_dim"],
    }
    embed = (
        2 * tokens * config["in_channels"] * patch * dim  # patch embedding
        + 2 * text_tokens * (config["text_dim"] * dim + dim * dim)  # text projection
        + 2 * (config["freq_dim"] * dim + dim * dim + dim * 6 * dim)  # timestep embedding
        + 2 * tokens * dim * config["out_channels"] * patch  # output projection
    )
    parts = {"self_attention": layers * self_attention, **{k: layers * v for k, v in per_block.items()}}
    parts["embeddings"] = embed
    parts["total"] = sum(parts.values())
    return parts


@dataclass
class ModelInfo:
    """A model's architecture, token grid and FLOP split at a video size (what `vsurgery info` prints)."""

    model: str
    fingerprint: str
    layers: int
    heads: int
    head_dim: int
    dim: int
    grid: dict
    tokens: int
    text_tokens: int
    self_attention_flops_per_layer: float
    self_attention_flops: float
    forward_flops: float
    self_attention_share: float

    def to_dict(self) -> dict:
        return asdict(self)


def model_info(spec: str, frames=None, height=None, width=None, text_tokens=None) -> ModelInfo:
    """Architecture, token grid and FLOP split of `spec` at a video size (model defaults fill gaps)."""
    config = load_config(spec)
    grid = resolve_grid(spec, config, frames, height, width)
    text_tokens = text_tokens or default_text_tokens(spec)
    flops = forward_flops(config, grid, text_tokens)
    return ModelInfo(
        model=spec, fingerprint=fingerprint(config), layers=config["num_layers"],
        heads=config["num_attention_heads"], head_dim=config["attention_head_dim"],
        dim=config["num_attention_heads"] * config["attention_head_dim"], grid=grid.to_dict(), tokens=grid.tokens,
        text_tokens=text_tokens, self_attention_flops_per_layer=flops["self_attention"] / config["num_layers"],
        self_attention_flops=flops["self_attention"], forward_flops=flops["total"],
        self_attention_share=flops["self_attention"] / flops["total"],
    )
