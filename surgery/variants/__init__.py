"""The registry of attention variants: plans and recipes name variants, never import paths."""

from __future__ import annotations

from ..errors import SurgeryError
from .base import AttentionVariant, VariantConfig, dense_attention_flops
from .full import FullAttention

VARIANTS: dict[str, type[AttentionVariant]] = {
    FullAttention.name: FullAttention,
}


def get_variant(name: str) -> type[AttentionVariant]:
    try:
        return VARIANTS[name]
    except KeyError:
        raise SurgeryError(f"unknown attention variant {name!r} (known: {', '.join(VARIANTS)})") from None


__all__ = ["VARIANTS", "AttentionVariant", "VariantConfig", "dense_attention_flops", "get_variant"]
