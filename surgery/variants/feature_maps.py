"""Learnable feature maps φ for the `linear` and `hybrid` variants, and the machinery they share.

Two forms (`kind`), each with an optional second layer as in Attention Surgery's ψ:

    ψ(x) = x·W + b                                  hidden_dim = 0
    ψ(x) = x·W + b + gelu(x·U + c)·V                hidden_dim > 0
    φ(x) = softmax([ψ(x), −ψ(x)])                   "hedgehog" (Zhang et al. 2024): 2F features
    φ(x) = [ψ_1(x)^1, ψ_2(x)^2, …, ψ_P(x)^P]        "polynomial" (Attention Surgery): P·F features

per head, with ψ of width F ("hedgehog") or P·F cut into P slices ψ_1 … ψ_P ("polynomial", P = degree),
W: [D, width], U: [D, h], V: [h, width]. Hedgehog's is the default: softmax features are strictly
positive, so every denominator φ_q(q)·Σφ_k(k) is positive and the hybrid's shared normaliser can never
be cancelled by negative linear mass, while odd powers of ψ can be negative; and the fused kernels
(`kernels/feature_map.py`, `kernels/linear_attention.py`) compute it. The polynomial is the paper's own
map, for recipes that follow it; it runs in PyTorch.

Init: W = the D×F identity (truncated or zero-padded when F ≠ D) — for the polynomial, in the slices of
even powers, with the odd ones at zero — b = c = 0, V = 0, U uniform in ±1/√D from torch's RNG. So
every layer starts at Hedgehog's identity map softmax([x, −x]), or at the polynomial's even powers of
x, both of which make φ_q(q)·φ_k(k) grow with q·k as softmax attention does and keep every feature
≥ 0 at init (so every denominator starts positive); the odd powers and a second layer start switched
off while still receiving gradient.
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

    feature_dim: F, the width of ψ (of each ψ_p for the polynomial); None means the head dim, so the
    identity init is exact at any head dim (128 for Wan, 32 for the tiny model).
    hidden_dim: h, the width of ψ's optional second layer; 0 gives a single linear layer.
    kind: "hedgehog" (φ = softmax([ψ, −ψ]), 2F features) or "polynomial" (φ = [ψ_1, ψ_2², …, ψ_P^P], P·F).
    degree: P, the polynomial's highest power (≥ 2: its init keeps only even powers).
    """

    feature_dim: int | None = None
    hidden_dim: int = 0
    kind: str = "hedgehog"
    degree: int = 2

    def __post_init__(self):
        if self.feature_dim is not None:
            _check_size("feature_dim", self.feature_dim, 1)
        _check_size("hidden_dim", self.hidden_dim, 0)
        if self.kind not in FEATURE_MAPS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, FEATURE_MAPS))}, got {self.kind!r}")
        _check_size("degree", self.degree, 2)

    def features(self, head_dim: int) -> int:
        """F for a layer of head dim `head_dim`."""
        return head_dim if self.feature_dim is None else self.feature_dim

    def psi_width(self, head_dim: int) -> int:
        """The width of ψ: F, or P·F for the polynomial."""
        return self.features(head_dim) * (self.degree if self.kind == "polynomial" else 1)

    def feature_count(self, head_dim: int) -> int:
        """The number of features of φ: 2F, or P·F for the polynomial."""
        return self.features(head_dim) * (self.degree if self.kind == "polynomial" else 2)


FEATURE_MAPS = ("hedgehog", "polynomial")


def feature_map_flops(tokens: int, heads: int, head_dim: int, feature_dim: int, hidden_dim: int) -> int:
    """Matmul FLOPs of one φ over `tokens` tokens: 2·tokens·H·(D·F + h·(D + F))."""
    return 2 * tokens * heads * (head_dim * feature_dim + hidden_dim * (head_dim + feature_dim))


class FeatureMap(nn.Module):
    """φ for every head of one layer; see the module docstring for its forms and init."""

    def __init__(self, heads: int, head_dim: int, feature_dim: int, hidden_dim: int, kind: str = "hedgehog",
                 degree: int = 2):
        super().__init__()
        identity = torch.eye(head_dim, feature_dim)
        if kind == "polynomial":  # the identity in the even powers' slices, zeros in the odd ones'
            identity = torch.cat([identity * (p % 2 == 0) for p in range(1, degree + 1)], dim=1)
        width = identity.shape[1]
        self.weight = nn.Parameter(identity.repeat(heads, 1, 1))  # [H, D, width]
        self.bias = nn.Parameter(torch.zeros(heads, width))  # [H, width]
        self.hidden_dim = hidden_dim
        self.kind, self.degree = kind, degree
        if hidden_dim:
            bound = 1.0 / math.sqrt(head_dim)
            self.hidden_weight = nn.Parameter(torch.empty(heads, head_dim, hidden_dim).uniform_(-bound, bound))
            self.hidden_bias = nn.Parameter(torch.zeros(heads, hidden_dim))  # [H, h]
            self.hidden_out = nn.Parameter(torch.zeros(heads, hidden_dim, width))  # [H, h, width]

    @property
    def fused(self) -> bool:
        """Whether the fused Triton ops compute this map: Hedgehog's with a single layer."""
        return self.kind == "hedgehog" and not self.hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, S, H, D]. Returns φ(x): [B, S, H, 2F or P·F] in x's dtype (parameters are cast to it)."""
        psi = torch.einsum("bshd,hdf->bshf", x, self.weight.to(x.dtype)) + self.bias.to(x.dtype)
        if self.hidden_dim:
            hidden = torch.einsum("bshd,hdk->bshk", x, self.hidden_weight.to(x.dtype))
            hidden = F.gelu(hidden + self.hidden_bias.to(x.dtype))
            psi = psi + torch.einsum("bshk,hkf->bshf", hidden, self.hidden_out.to(x.dtype))
        if self.kind == "polynomial":
            return torch.cat([part**p for p, part in enumerate(psi.chunk(self.degree, dim=-1), start=1)], dim=-1)
        return torch.cat([psi, -psi], dim=-1).softmax(dim=-1)

    def forward_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` through the fused Triton op (`kernels/feature_map.py`), the variants' CUDA path: same
        shapes and result. Falls back to `forward` where the op does not apply: a map it does not compute
        (`fused`), or a dtype, head dim, F or device it does not take (`unsupported_reason`)."""
        from ..kernels.feature_map import feature_map, unsupported_reason  # Triton only where the kernel runs

        if not self.fused or unsupported_reason(x, self.weight):
            return self(x)
        return feature_map(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        heads, head_dim, width = self.weight.shape
        kind = f", kind=polynomial, degree={self.degree}" if self.kind == "polynomial" else ""
        return f"heads={heads}, head_dim={head_dim}, psi_width={width}, hidden_dim={self.hidden_dim}{kind}"


class FeatureMapAttention(AttentionVariant):
    """Base of the variants with learned φ_q and φ_k: one separate pair per layer (processor)."""

    config: FeatureMapConfig
    training_free = False  # an untrained φ only approximates softmax attention loosely: distill first

    def __init__(self, config: FeatureMapConfig, *, heads: int, head_dim: int, dim: int, layer_index: int = 0):
        super().__init__(config, heads=heads, head_dim=head_dim, dim=dim, layer_index=layer_index)
        sizes = (heads, head_dim, config.features(head_dim), config.hidden_dim, config.kind, config.degree)
        self.feature_map_q = FeatureMap(*sizes)
        self.feature_map_k = FeatureMap(*sizes)

    def fused_map_parameters(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """φ_q's and φ_k's W and b in x's dtype, for the ops that compute both maps inside their kernels
        (`kernels/linear_attention.py`, `kernels/tile_linear.py`); None where they do not apply: a map they do not
        compute (`FeatureMap.fused`), or a dtype, head dim, F or device they do not take."""
        from ..kernels.linear_attention import unsupported_reason  # Triton only where the kernels run

        if not self.feature_map_q.fused or unsupported_reason(x, self.feature_map_q.weight):
            return None
        return [p.to(x.dtype) for m in (self.feature_map_q, self.feature_map_k) for p in (m.weight, m.bias)]

    @classmethod
    def linear_attention_flops(
        cls, config: FeatureMapConfig, queries: int, keys: int, heads: int, head_dim: int
    ) -> int:
        """Matmul FLOPs of `linear_attention_sums` with its feature maps, for `queries` queries over
        `keys` linear keys (none when there are no linear keys), with ψ of width F' (`psi_width`: F, or P·F)
        and φ of M features (`feature_count`: 2F, or P·F):

        φ_q over the queries and φ_k over the keys (`feature_map_flops`), the summary
        φ(K)ᵀ[V, 1] (2·H·keys·M·(D+1): Σφ(k)ᵀv and Σφ(k) in one matmul), and applying it to φ(Q)
        (2·H·queries·M·(D+1)); in all 2·H·(queries + keys)·(D·F' + h·(D+F') + M·(D+1)).
        """
        if keys == 0:
            return 0
        maps = feature_map_flops(queries + keys, heads, head_dim, config.psi_width(head_dim), config.hidden_dim)
        sums = 2 * heads * (queries + keys) * config.feature_count(head_dim) * (head_dim + 1)
        return maps + sums

    def linear_attention_sums(self, q, k, v, kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-causal linear attention's numerator and denominator, never forming a query×key matrix.

        q: [B, S, H, D] queries; k, v: [B, L, H, D] linear keys and values, all in one dtype; kernel:
        φ through `FeatureMap.forward_kernel` (the CUDA path) rather than the reference `forward`.
        Returns φ_q(q_i)·Σ_j φ_k(k_j)ᵀv_j: [B, S, H, D] and φ_q(q_i)·Σ_j φ_k(k_j): [B, S, H, 1].
        """
        phi_q = self.feature_map_q.forward_kernel(q) if kernel else self.feature_map_q(q)  # [B, S, H, M]
        sums = torch.einsum("bshf,bhfe->bshe", phi_q, self.linear_summary(k, v, kernel))  # [B, S, H, D+1]
        return sums[..., :-1], sums[..., -1:]

    def linear_summary(self, k, v, kernel: bool = False, skip_every: int = 0) -> torch.Tensor:
        """Σ_j φ_k(k_j)ᵀ[v_j, 1]: [B, H, M, D+1] (M features) for linear keys and values k, v [B, L, H, D];
        skip_every = R > 0 leaves out the keys at multiples of R. The column of ones makes Σφ(k) ride along in the
        matmul of Σφ(k)ᵀv. kernel: the fused op (`kernels/linear_attention.py` `linear_summary`, φ_k never stored)
        where it applies, else φ_k through `FeatureMap.forward_kernel`."""
        feature_map = self.feature_map_k
        if kernel:
            from ..kernels.linear_attention import linear_summary, unsupported_reason

            if feature_map.fused and not unsupported_reason(k, feature_map.weight):
                return linear_summary(k, v, feature_map.weight.to(k.dtype), feature_map.bias.to(k.dtype), skip_every)
        if skip_every:
            k, v = linear_tokens(k, skip_every), linear_tokens(v, skip_every)
        phi_k = feature_map.forward_kernel(k) if kernel else feature_map(k)  # [B, L, H, M]
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
