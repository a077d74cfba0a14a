"""`linear`: non-causal linear attention with learned feature maps φ_q, φ_k (per layer, per head).

    out_i = φ_q(q_i)·Σ_j φ_k(k_j)ᵀv_j / (φ_q(q_i)·Σ_j φ_k(k_j))

over all S tokens of the grid, computed as a [2F, D+1] summary per head so no S×S matrix is ever
formed. φ is `feature_maps.FeatureMap` (Hedgehog's softmax([ψ(x), −ψ(x)]), identity init); its
features are positive, so the denominator is too.
"""

from __future__ import annotations

import dataclasses

import torch

from ..grid import VideoGrid
from .feature_maps import FeatureMapAttention, FeatureMapConfig, promoted


@dataclasses.dataclass(frozen=True)
class LinearConfig(FeatureMapConfig):
    """Only the feature-map sizes (`FeatureMapConfig`): every key is a linear key."""


class LinearAttention(FeatureMapAttention):
    name = "linear"
    Config = LinearConfig

    @classmethod
    def flops(cls, config: LinearConfig, grid: VideoGrid, heads: int, head_dim: int) -> float:
        """Per video, with S tokens, F = feature_dim, h = hidden_dim
        (for the polynomial map read P·F for F and for 2F, `FeatureMapConfig.psi_width`, `feature_count`):

        4·H·S·(D·F + h·(D+F) + 2F·(D+1)) — φ_q and φ_k over S tokens each, the summary
        φ(K)ᵀ[V, 1] and its application to φ(Q) (see `linear_attention_flops`). The final division
        and the feature maps' bias, gelu and softmax are not matmuls and are not counted.
        """
        return float(cls.linear_attention_flops(config, grid.tokens, grid.tokens, heads, head_dim))

    @classmethod
    def density(cls, config: LinearConfig, grid: VideoGrid) -> float:
        return 0.0

    def attend_reference(self, q, k, v, grid, x=None):
        """q, k, v: [B, S, H, D] in raster order. Sums in fp32 (fp64 stays). Returns [B, S, H, D] in q's dtype."""
        # Autocast would run the matmuls in half precision again.
        with torch.autocast(q.device.type, enabled=False):
            numerator, denominator = self.linear_attention_sums(*promoted(q, k, v))
        return (numerator / denominator).to(q.dtype)

    def attend_kernel(self, q, k, v, grid, x=None):
        """The CUDA path: the fused linear-attention op (`kernels/linear_attention.py`), which computes φ_q and
        φ_k inside its kernels and never writes them (nor the [B, S, H, D+1] sums) to memory. Where it does not
        apply — a map it does not compute (`FeatureMap.fused`: a second layer, the polynomial), or a dtype, head
        dim, F or device it does not take — φ goes through the fused feature-map op where it applies and the
        summary φ(K)ᵀ[V, 1] and its application to φ(Q) through two batched matmuls in q's dtype (fp32 sums inside
        them), with the division in fp32."""
        from ..kernels.linear_attention import linear_attention  # Triton only where it runs

        with torch.autocast(q.device.type, enabled=False):
            params = self.fused_map_parameters(q)
            if params is not None:
                return linear_attention(q, k, v, *params)
            numerator, denominator = self.linear_attention_sums(q, k, v, kernel=True)
        return (numerator.float() / denominator.float()).to(q.dtype)
