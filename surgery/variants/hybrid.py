"""`hybrid` (Attention Surgery, Ghafoorian et al.): exact softmax on a uniform subsample of the keys,
linear attention on the rest, under one shared normaliser.

Keys and values split into softmax tokens T_S = {n : n mod R = 0} and linear tokens T_L (the rest);
every query attends to all keys:

    out_i = [Σ_{j∈T_S} exp(s_ij − c_i) v_j + φ_q(q_i)·Σ_{j∈T_L} φ_k(k_j)ᵀv_j]
          / [Σ_{j∈T_S} exp(s_ij − c_i)     + φ_q(q_i)·Σ_{j∈T_L} φ_k(k_j)]

with s_ij = q_i·k_j/√D and c_i = max_{j∈T_S} s_ij. The linear term is deliberately *not* scaled by
exp(−c_i): it is in units where the largest softmax weight of query i is 1, so the balance between
the two branches moves with c_i. That is the paper's formula, and what the fused kernel reproduces.
With R = 1, T_L is empty and this is exactly full attention.

Why the stride runs over the flat raster index n = t·H·W + h·W + w rather than per axis: it is the
paper's own definition (i mod R = 1, counting from 1); it works for every rate R and every grid,
partial ones included, where per-axis strides need R to factor over the axes; it keeps exactly
|T_S| = ⌈S/R⌉ tokens, so the cost is S·⌈S/R⌉ for any R; and T_S is a strided slice k[:, ::R] that
a kernel loads with a fixed stride and no index list. The samples cover every frame and every row;
along a row they sit every R-th column, shifted from row to row by W mod R.

The reference forms the [S, ⌈S/R⌉] score matrix of the softmax branch; the linear branch never
forms a query×key matrix.
"""

from __future__ import annotations

import dataclasses

import torch

from ..grid import VideoGrid
from .base import softmax_scale
from .feature_maps import FeatureMapAttention, FeatureMapConfig, linear_tokens, promoted


@dataclasses.dataclass(frozen=True)
class HybridConfig(FeatureMapConfig):
    """rate: R, one softmax key every R tokens of the raster order (R = 1: full attention);
    plus the feature-map sizes of `FeatureMapConfig`. Default R = 2, the paper's best-scoring 15×R2."""

    rate: int = 2

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.rate, bool) or not isinstance(self.rate, int) or self.rate < 1:
            raise ValueError(f"rate must be an int ≥ 1 (one softmax key every `rate` tokens), got {self.rate!r}")


def softmax_token_count(tokens: int, rate: int) -> int:
    """|T_S| = ⌈S/R⌉: raster indices 0, R, 2R, … below S."""
    return -(-tokens // rate)


def linear_token_index(tokens: int, rate: int, device: torch.device) -> torch.Tensor:
    """Raster indices of T_L (those n < S with n mod R ≠ 0), ascending: [S − ⌈S/R⌉] int64."""
    softmax_keys = softmax_token_count(tokens, rate)
    # Row i holds iR+1 … iR+R−1; flattened they ascend, so those below S are a prefix (no data-dependent shape).
    rows = torch.arange(softmax_keys, device=device).unsqueeze(1) * rate
    index = rows + torch.arange(1, rate, device=device)  # [S', R − 1]
    return index.flatten()[: tokens - softmax_keys]


class _SplitTokens(torch.autograd.Function):
    """x [B, S, ...] → (x[:, ::R], linear_tokens(x, R)), both contiguous. Its backward writes both gradients
    into one new tensor, where autograd through the slices would zero-fill two full-size tensors, copy into
    each and add them (0.1–0.4 ms of the variant's fwd+bwd at R = 8 on the 1.3B shape, H100)."""

    @staticmethod
    def forward(ctx, x, rate):
        ctx.rate, ctx.shape = rate, x.shape
        return x[:, ::rate].contiguous(), linear_tokens(x, rate)

    @staticmethod
    def backward(ctx, grad_softmax, grad_linear):
        rate, tokens = ctx.rate, ctx.shape[1]
        rows = tokens // rate
        grad = grad_linear.new_empty(ctx.shape)
        grad[:, ::rate] = grad_softmax  # autograd hands zeros for an unused output, never None
        # The linear tokens through linear_tokens' views: rows of R without their first token, then the tail.
        body = rows * (rate - 1)
        grad[:, :rows * rate].unflatten(1, (rows, rate))[:, :, 1:] = \
            grad_linear[:, :body].unflatten(1, (rows, rate - 1))
        grad[:, rows * rate + 1:] = grad_linear[:, body:]
        return grad, None


def split_tokens(x: torch.Tensor, rate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax tokens x[:, ::R], linear tokens `linear_tokens(x, R)`) of x [B, S, ...], as contiguous copies."""
    return _SplitTokens.apply(x, rate)


class HybridAttention(FeatureMapAttention):
    name = "hybrid"
    Config = HybridConfig
    plan_candidates = ({"rate": 2}, {"rate": 4}, {"rate": 8})

    @classmethod
    def flops(cls, config: HybridConfig, grid: VideoGrid, heads: int, head_dim: int) -> float:
        """Per video, with S tokens, S' = |T_S| = ⌈S/R⌉, L = S − S', F = feature_dim, h = hidden_dim
        (for the polynomial map read P·F for F and for 2F, `FeatureMapConfig.psi_width`, `feature_count`):

        4·H·S·S'·D for the softmax branch (QK_Sᵀ and PV_S), plus, when L > 0, the linear branch
        2·H·(S + L)·(D·F + h·(D+F) + 2F·(D+1)): φ_q over all S queries, φ_k over the L linear keys,
        the summary φ(K_L)ᵀ[V_L, 1] and its application to φ(Q). Exponentials, row sums and the final
        division are not matmuls and are not counted, as in dense attention's 4·H·S²·D.
        """
        tokens = grid.tokens
        softmax_keys = softmax_token_count(tokens, config.rate)
        softmax_branch = 4 * heads * tokens * softmax_keys * head_dim
        linear_branch = cls.linear_attention_flops(config, tokens, tokens - softmax_keys, heads, head_dim)
        return float(softmax_branch + linear_branch)

    @classmethod
    def density(cls, config: HybridConfig, grid: VideoGrid) -> float:
        """|T_S|/S = ⌈S/R⌉/S: every query scores every softmax key exactly."""
        return softmax_token_count(grid.tokens, config.rate) / grid.tokens

    def attend_reference(self, q, k, v, grid, x=None):
        """q, k, v: [B, S, H, D] in raster order. Sums in fp32 (fp64 stays). Returns [B, S, H, D] in q's dtype."""
        rate, tokens = self.config.rate, q.shape[1]
        # Autocast would run the matmuls in half precision again.
        with torch.autocast(q.device.type, enabled=False):
            q32, k32, v32 = promoted(q, k, v)
            scores = torch.einsum("bshd,bthd->bhst", q32, k32[:, ::rate]) * softmax_scale(q.shape[-1])  # [B, H, S, S']
            # exp(s − c) with c the row max over T_S: the largest softmax weight of each query is 1.
            weights = (scores - scores.amax(dim=-1, keepdim=True)).exp()
            numerator = torch.einsum("bhst,bthd->bshd", weights, v32[:, ::rate])  # [B, S, H, D]
            denominator = weights.sum(dim=-1).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
            if softmax_token_count(tokens, rate) < tokens:
                linear_numerator, linear_denominator = self.linear_attention_sums(
                    q32, linear_tokens(k32, rate), linear_tokens(v32, rate)
                )
                numerator = numerator + linear_numerator
                denominator = denominator + linear_denominator
        return (numerator / denominator).to(q.dtype)

    def attend_kernel(self, q, k, v, grid, x=None):
        """The fused Triton op (`kernels/hybrid.py`): same math and result as `attend_reference`. φ_q runs
        through the fused feature-map op (`kernels/feature_map.py`); the summary φ(K_L)ᵀ[V_L, 1] through the
        linear op's summary kernels (`kernels/linear_attention.py` `linear_summary`: φ_k computed inside, never
        stored; fp32 sums), where they apply, else φ_k through the feature-map op and a torch matmul."""
        from ..kernels.hybrid import hybrid_attention  # Triton is imported only where the kernel runs

        rate, tokens, scale = self.config.rate, q.shape[1], softmax_scale(q.shape[-1])
        with torch.autocast(q.device.type, enabled=False):
            if softmax_token_count(tokens, rate) == tokens:
                return hybrid_attention(q, k, v, None, None, rate, scale)
            phi_q = self.feature_map_q.forward_kernel(q)  # [B, S, H, 2F]
            if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *self.parameters())):
                # Split copies, so that the backward writes each of dk, dv once (`_SplitTokens`): reading the
                # linear keys in place would leave two full-size gradients for autograd to add.
                (k_soft, k_lin), (v_soft, v_lin) = split_tokens(k, rate), split_tokens(v, rate)
                summary = self.linear_summary(k_lin, v_lin, kernel=True)
                # k_soft, v_soft already hold only T_S: the op takes all of them as softmax keys (rate 1).
                return hybrid_attention(q, k_soft, v_soft, phi_q, summary, 1, scale)
            # Inference: both branches read k and v in place (no copies).
            summary = self.linear_summary(k, v, kernel=True, skip_every=rate)
            return hybrid_attention(q, k, v, phi_q, summary, rate, scale)
