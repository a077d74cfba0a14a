"""The registry of attention variants: plans and recipes name variants, never import paths."""

from __future__ import annotations

from ..errors import SurgeryError
from .base import AttentionVariant, VariantConfig, dense_attention_flops
from .full import FullAttention
from .hybrid import HybridAttention
from .hybrid_selected import HybridSelectedAttention
from .linear import LinearAttention
from .vmoba import VideoMixtureOfBlockAttention
from .vsa import VideoSparseAttention

VARIANTS: dict[str, type[AttentionVariant]] = {
    FullAttention.name: FullAttention,
    HybridAttention.name: HybridAttention,
    HybridSelectedAttention.name: HybridSelectedAttention,
    LinearAttention.name: LinearAttention,
    VideoSparseAttention.name: VideoSparseAttention,
    VideoMixtureOfBlockAttention.name: VideoMixtureOfBlockAttention,
}


def get_variant(name: str) -> type[AttentionVariant]:
    try:
        return VARIANTS[name]
    except KeyError:
        raise SurgeryError(f"unknown attention variant {name!r} (known: {', '.join(VARIANTS)})") from None


__all__ = ["VARIANTS", "AttentionVariant", "VariantConfig", "dense_attention_flops", "get_variant"]
