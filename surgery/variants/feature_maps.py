"""Learnable feature maps φ for the `linear` and `hybrid` variants, and the machinery they share.

Form (Hedgehog, Zhang et al. 2024, with an optional second layer as in Attention Surgery's ψ):

    ψ(x) = x·W + b                                  hidden_dim = 0
    ψ(x) = x·W + b + gelu(x·U + c)·V                hidden_dim > 0
    φ(x) = softmax([ψ(x), −ψ(x)])                   over its 2F features

per head, with W: [D, F], U: [D, h], V: [h, F]. Why this form rather than Attention Surgery's
polynomial [ψ1(x)^1, …, ψP(x)^P]: softmax features are strictly positive, so every denominator
φ_q(q)·Σφ_k(k) is positive and the hybrid's shared normaliser can never be cancelled by negative
linear mass (odd powers of ψ can be negative); and the paper leaves the width and nonlinearity of
its polynomial unspecified. The second layer gives ψ the paper's two-layer depth when asked for.

Init: W = the D×F identity (truncated or zero-padded when F ≠ D), b = c = 0, V = 0, U uniform in
±1/√D from torch's RNG. So every layer starts at Hedgehog's identity map softmax([x, −x]), which
makes φ_q(q)·φ_k(k) grow with q·k as softmax attention does, and a second layer starts switched
off (V = 0) while still receiving gradient.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import AttentionVariant, VariantConfig


def _check_size(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int ≥ {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class FeatureMapConfig(VariantConfig):
    """Feature-map sizes shared by `linear` and `hybrid`.

    feature_dim: F, the width of ψ (φ has 2F features); None means the head dim, so the identity
    init is exact at any head dim (128 for Wan, 32 for the tiny model).
    hidden_dim: h, the width of ψ's optional second layer; 0 gives Hedgehog's single linear layer.
    """

    feature_dim: int | None = None
    hidden_dim: int = 0

    def __post_init__(self):
        if self.feature_dim is not None:
            _check_size("feature_dim", self.feature_dim, 1)
        _check_size("hidden_dim", self.hidden_dim, 0)

    def features(self, head_dim: int) -> int:
        """F for a layer of head dim `head_dim`."""
        return head_dim if self.feature_dim is None else self.feature_dim


def feature_map_flops(tokens: int, heads: int, head_dim: int, feature_dim: int, hidden_dim: int) -> int:
    """Matmul FLOPs of one φ over `tokens` tokens: 2·tokens·H·(D·F + h·(D + F))."""
    return 2 * tokens * heads * (head_dim * feature_dim + hidden_dim * (head_dim + feature_dim))


class FeatureMap(nn.Module):
    """φ for every head of one layer; see the module docstring for its form and init."""

    def __init__(self, heads: int, head_dim: int, feature_dim: int, hidden_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim, feature_dim).repeat(heads, 1, 1))  # [H, D, F]
        self.bias = nn.Parameter(torch.zeros(heads, feature_dim))  # [H, F]
        self.hidden_dim = hidden_dim
        if hidden_dim:
            bound = 1.0 / math.sqrt(head_dim)
            self.hidden_weight = nn.Parameter(torch.empty(heads, head_dim, hidden_dim).uniform_(-bound, bound))
            self.hidden_bias = nn.Parameter(torch.zeros(heads, hidden_dim))  # [H, h]
            self.hidden_out = nn.Parameter(torch.zeros(heads, hidden_dim, feature_dim))  # [H, h, F]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, S, H, D]. Returns φ(x): [B, S, H, 2F] in x's dtype (parameters are cast to it)."""
        psi = torch.einsum("bshd,hdf->bshf", x, self.weight.to(x.dtype)) + self.bias.to(x.dtype)
        if self.hidden_dim:
            hidden = torch.einsum("bshd,hdk->bshk", x, self.hidden_weight.to(x.dtype))
            hidden = F.gelu(hidden + self.hidden_bias.to(x.dtype))
            psi = psi + torch.einsum("bshk,hkf->bshf", hidden, self.hidden_out.to(x.dtype))
        return torch.cat([psi, -psi], dim=-1).softmax(dim=-1)

    def forward_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` through the fused Triton op (`kernels/feature_map.py`), the variants' CUDA path: same
        shapes and result. Falls back to `forward` where the op does not apply: a second layer
        (hidden_dim > 0), or a dtype, head dim, F or device it does not take (`unsupported_reason`)."""
        from ..kernels.feature_map import feature_map, unsupported_reason  # Triton only where the kernel runs

        if self.hidden_dim or unsupported_reason(x, self.weight):
            return self(x)
        return feature_map(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        heads, head_dim, feature_dim = self.weight.shape
        return f"heads={heads}, head_dim={head_dim}, feature_dim={feature_dim}, hidden_dim={self.hidden_dim}"


class FeatureMapAttention(AttentionVariant):
    """Base of the variants with learned φ_q and φ_k: one separate pair per layer (processor)."""

    config: FeatureMapConfig
    training_free = False  # an untrained φ only approximates softmax attention loosely: distill first

    def __init__(self, config: FeatureMapConfig, *, heads: int, head_dim: int, dim: int, layer_index: int = 0):
        super().__init__(config, heads=heads, head_dim=head_dim, dim=dim, layer_index=layer_index)
        sizes = (heads, head_dim, config.features(head_dim), config.hidden_dim)
        self.feature_map_q = FeatureMap(*sizes)
        self.feature_map_k = FeatureMap(*sizes)

    @classmethod
    def linear_attention_flops(
        cls, config: FeatureMapConfig, queries: int, keys: int, heads: int, head_dim: int
    ) -> int:
        """Matmul FLOPs of `linear_attention_sums` with its feature maps, for `queries` queries over
        `keys` linear keys (none when there are no linear keys):

        φ_q over the queries and φ_k over the keys (`feature_map_flops`), the summary
        φ(K)ᵀ[V, 1] (2·H·keys·2F·(D+1): Σφ(k)ᵀv and Σφ(k) in one matmul), and applying it to φ(Q)
        (2·H·queries·2F·(D+1)); in all 2·H·(queries + keys)·(D·F + h·(D+F) + 2F·(D+1)).
        """
        if keys == 0:
            return 0
        feature_dim = config.features(head_dim)
        maps = feature_map_flops(queries + keys, heads, head_dim, feature_dim, config.hidden_dim)
        sums = 2 * heads * (queries + keys) * 2 * feature_dim * (head_dim + 1)
        return maps + sums

    def linear_attention_sums(self, q, k, v, kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-causal linear attention's numerator and denominator, never forming a query×key matrix.

        q: [B, S, H, D] queries; k, v: [B, L, H, D] linear keys and values, all in one dtype; kernel:
        φ through `FeatureMap.forward_kernel` (the CUDA path) rather than the reference `forward`.
        Returns φ_q(q_i)·Σ_j φ_k(k_j)ᵀv_j: [B, S, H, D] and φ_q(q_i)·Σ_j φ_k(k_j): [B, S, H, 1].
        """
        phi_q = self.feature_map_q.forward_kernel(q) if kernel else self.feature_map_q(q)  # [B, S, H, 2F]
        sums = torch.einsum("bshf,bhfe->bshe", phi_q, self.linear_summary(k, v, kernel))  # [B, S, H, D+1]
        return sums[..., :-1], sums[..., -1:]

    def linear_summary(self, k, v, kernel: bool = False, skip_every: int = 0) -> torch.Tensor:
        """Σ_j φ_k(k_j)ᵀ[v_j, 1]: [B, H, 2F, D+1] for linear keys and values k, v [B, L, H, D]; skip_every = R > 0
        leaves out the keys at multiples of R. The column of ones makes Σφ(k) ride along in the matmul of
        Σφ(k)ᵀv. kernel: the fused op (`kernels/linear_attention.py` `linear_summary`, φ_k never stored) where it
        applies, else φ_k through `FeatureMap.forward_kernel`."""
        feature_map = self.feature_map_k
        if kernel:
            from ..kernels.linear_attention import linear_summary, unsupported_reason

            if not feature_map.hidden_dim and not unsupported_reason(k, feature_map.weight):
                return linear_summary(k, v, feature_map.weight.to(k.dtype), feature_map.bias.to(k.dtype), skip_every)
        if skip_every:
            k, v = linear_tokens(k, skip_every), linear_tokens(v, skip_every)
        phi_k = feature_map.forward_kernel(k) if kernel else feature_map(k)  # [B, L, H, 2F]
        return torch.einsum("blhf,blhe->bhfe", phi_k, F.pad(v, (0, 1), value=1.0))


def linear_tokens(x: torch.Tensor, rate: int) -> torch.Tensor:
    """x without the tokens at multiples of rate (`hybrid`'s linear tokens, `linear_token_index`) for
    x [B, S, ...], through views and one copy: its backward is a strided copy into zeros, where index_select's
    is an index_add with atomics (0.38 ms for k alone at the 1.3B shape on an H200)."""
    tokens = x.shape[1]
    whole = tokens // rate * rate  # the rows of R that fit: each drops its first token
    body = x[:, :whole].unflatten(1, (tokens // rate, rate))[:, :, 1:].flatten(1, 2)
    # Past them: the softmax key at `whole` (if any), then the linear tail.
    return torch.cat([body, x[:, whole + 1:]], dim=1) if whole + 1 < tokens else body


def promoted(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors in fp32, or fp64 when they come in fp64: half-precision inputs are summed in fp32."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [t.to(dtype) for t in tensors]
