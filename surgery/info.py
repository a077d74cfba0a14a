"""What a model is and where its FLOPs go: the numbers behind `vsurgery info`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .grid import VideoGrid
from .loading import load_config
from .model import default_text_tokens, expert_spec, model_kind, resolve_grid, split_expert, timestep_band
from .variants import dense_attention_flops
from .wan import fingerprint, latent_channels


def forward_flops(config: dict, grid: VideoGrid, text_tokens: int, image_tokens: int = 0,
                  per_token_timesteps: bool = False) -> dict[str, float]:
    """Matmul FLOPs of one transformer forward for one video, by part (norms and elementwise ops left out).

    image_tokens: CLIP image tokens a model with image_dim attends to in cross-attention (Wan2.1 I2V).
    per_token_timesteps: one timestep per token (Wan2.2 TI2V), so the timestep embedding runs per token."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    tokens, layers = grid.tokens, config["num_layers"]
    patch = math.prod(config["patch_size"])
    image_tokens = image_tokens if config.get("image_dim") else 0
    self_attention = dense_attention_flops(tokens, config["num_attention_heads"], config["attention_head_dim"])
    per_block = {
        "self_attention_projections": 2 * tokens * dim * dim * 4,  # q, k, v, out
        # q, out; k, v on text (and the added k, v on image tokens)
        "cross_attention_projections": 2 * (2 * tokens + 2 * text_tokens + 2 * image_tokens) * dim * dim,
        "cross_attention": 4 * tokens * (text_tokens + image_tokens) * dim,
        "ffn": 2 * 2 * tokens * dim * config["ffn_dim"],
    }
    image_dim = config.get("image_dim") or 0
    embed = (
        2 * tokens * config["in_channels"] * patch * dim  # patch embedding
        + 2 * text_tokens * (config["text_dim"] * dim + dim * dim)  # text projection
        + 2 * (tokens if per_token_timesteps else 1) * (config["freq_dim"] * dim + dim * dim + dim * 6 * dim)
        + 2 * image_tokens * (image_dim * image_dim + image_dim * dim)  # image embedding's feed-forward
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
    image: str | None = None  # "required" (image-to-video), "optional" (TI2V) or None
    image_tokens: int = 0
    latent_channels: int = 16
    vae_scale: tuple[int, int, int] = (4, 8, 8)
    boundary_ratio: float | None = None
    # Per expert (one, or Wan2.2 A14B's two): its layers, the timesteps it serves and its FLOPs per forward.
    experts: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def model_info(spec: str, frames=None, height=None, width=None, text_tokens=None) -> ModelInfo:
    """Architecture, token grid and FLOP split of `spec` at a video size (model defaults fill gaps)."""
    kind, (base, expert) = model_kind(spec), split_expert(spec)
    names = kind.experts if expert is None else (expert,)
    configs = {name: load_config(expert_spec(base, name) if kind.two_experts else spec) for name in names}
    config = next(iter(configs.values()))
    grid = resolve_grid(spec, config, frames, height, width)
    text_tokens = text_tokens or default_text_tokens(spec)
    image_tokens = kind.image_tokens or 0
    flops = forward_flops(config, grid, text_tokens, image_tokens, kind.expand_timesteps)
    experts = {}
    for name, expert_config in configs.items():
        expert_flops = forward_flops(expert_config, grid, text_tokens, image_tokens, kind.expand_timesteps)
        band = timestep_band(expert_spec(base, name)) if kind.two_experts else (0.0, 1.0)
        experts[name] = {
            "fingerprint": fingerprint(expert_config), "layers": expert_config["num_layers"],
            "timesteps": [band[0] * 1000, band[1] * 1000],
            "self_attention_flops": expert_flops["self_attention"], "forward_flops": expert_flops["total"],
        }
    return ModelInfo(
        model=spec, fingerprint=fingerprint(config), layers=config["num_layers"],
        heads=config["num_attention_heads"], head_dim=config["attention_head_dim"],
        dim=config["num_attention_heads"] * config["attention_head_dim"], grid=grid.to_dict(), tokens=grid.tokens,
        text_tokens=text_tokens, self_attention_flops_per_layer=flops["self_attention"] / config["num_layers"],
        self_attention_flops=flops["self_attention"], forward_flops=flops["total"],
        self_attention_share=flops["self_attention"] / flops["total"],
        image=kind.image, image_tokens=image_tokens if config.get("image_dim") else 0,
        latent_channels=latent_channels(config), vae_scale=kind.vae_scale, boundary_ratio=kind.boundary_ratio,
        experts=experts,
    )
