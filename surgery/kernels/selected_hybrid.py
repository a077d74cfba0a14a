"""Block-sparse softmax attention plus a linear term under one shared normaliser: the softmax branch of the
`hybrid_selected` variant (`variants/hybrid_selected.py`), whose linear term over the keys no query tile selected
is made by the caller (per key tile summaries; complement = total − the selected tiles' sums).

Per batch and head, with query i's selected keys K_i (the listed key blocks of its tile, as `block_sparse`),
s_ij = scale·q_i·k_j, c_i = max_{j∈K_i} s_ij and the linear terms N_i [D], E_i given:

    out_i = (A_i + N_i) / (l_i + E_i),   A_i = Σ_{j∈K_i} exp(s_ij − c_i) v_j,   l_i = Σ_{j∈K_i} exp(s_ij − c_i).

N and E are in units where the largest softmax weight of the row is 1, as in `hybrid` (`kernels/hybrid.py`): they
are added unscaled after the walk, when the running max has reached c.

Kernels: `block_sparse`'s, with their linear option (HAS_LINEAR). The forward walks the listed blocks with an
online softmax that also tracks each row's argmax key, adds N and E, and stores den = l + E and the argmax beside
lse = c + ln den. The backward is flash attention's with that lse and o (P = exp(s − lse), Δ = rowsum(do∘o)) plus
the normaliser's gradient dc_i = (do_i·N_i − Δ_i·E_i)/den_i at the argmax score (`hybrid.py` derives it): the
query-major dq pass and the key-major dk, dv pass add it where the key is the row's argmax, so the backward keeps
`block_sparse`'s two recompute passes with no atomics (deterministic). dN = do/den and dE = −Δ/den go back to the
caller's linear term.
"""

from __future__ import annotations

import torch

from .block_sparse import _check as _check_blocks
from .block_sparse import block_sparse_attn_bwd, block_sparse_attn_fwd, listed_blocks_mask


class SelectedHybridFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lin_num, lin_den, kv_block_index, kv_block_count, q_offsets, kv_offsets, max_q_tile,
                max_kv_block, scale):
        o, lse, den, amax = block_sparse_attn_fwd(q, k, v, kv_block_index, kv_block_count, q_offsets, kv_offsets,
                                                  max_q_tile, max_kv_block, scale, linear=(lin_num, lin_den))
        ctx.save_for_backward(q, k, v, o, lse, lin_num, lin_den, den, amax, kv_block_index, kv_block_count,
                              q_offsets, kv_offsets)
        ctx.max_q_tile, ctx.max_kv_block, ctx.scale = max_q_tile, max_kv_block, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, lin_num, lin_den, den, amax, kv_block_index, kv_block_count, q_offsets, kv_offsets = \
            ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv, dnum, dden = block_sparse_attn_bwd(
            do, q, k, v, o, lse, kv_block_index, kv_block_count, q_offsets, kv_offsets, ctx.max_q_tile,
            ctx.max_kv_block, ctx.scale, linear=(lin_num, lin_den, den, amax))
        return dq, dk, dv, dnum, dden, None, None, None, None, None, None, None


def _check(q, k, v, lin_num, lin_den, kv_block_index, kv_block_count, q_offsets, kv_offsets, max_q_tile,
           max_kv_block):
    _check_blocks(q, k, v, kv_block_index, kv_block_count, q_offsets, kv_offsets, max_q_tile, max_kv_block)
    B, S, H, _ = q.shape
    if lin_num.shape != q.shape or lin_den.shape != (B, H, S):
        raise ValueError(f"lin_num must be [B, S, H, D] like q {tuple(q.shape)} and lin_den [B, H, S], got "
                         f"{tuple(lin_num.shape)}, {tuple(lin_den.shape)}")


def selected_hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lin_num: torch.Tensor,
    lin_den: torch.Tensor,
    kv_block_index: torch.Tensor,
    kv_block_count: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    max_q_tile: int = 64,
    max_kv_block: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention of each query tile over its listed key blocks plus a linear term, under one normaliser
    (Triton, CUDA or interpreter); see the module docstring for the formula.

    Args:
        q, k, v, kv_block_index, q_offsets, kv_offsets, max_q_tile, max_kv_block, scale: as `block_sparse_attention`.
        kv_block_count: [B, H, NQ], every entry ≥ 1: a row's max softmax score sets the units of N and E (not
            checked here, which would cost a host sync; the reference checks it).
        lin_num: [B, S, H, D] N, the linear numerator of each query, in units where its max softmax weight is 1.
        lin_den: [B, H, S] E, the linear denominator likewise (computed in fp32).

    Returns:
        out [B, S, H, D] in q's dtype and strides; differentiable in q, k, v, lin_num and lin_den.
    """
    _check(q, k, v, lin_num, lin_den, kv_block_index, kv_block_count, q_offsets, kv_offsets, max_q_tile,
           max_kv_block)
    q, k, v, lin_num = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, lin_num))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return SelectedHybridFunction.apply(q, k, v, lin_num, lin_den.float().contiguous(), kv_block_index.contiguous(),
                                        kv_block_count.contiguous(), q_offsets.contiguous(), kv_offsets.contiguous(),
                                        int(max_q_tile), int(max_kv_block), scale)


def selected_hybrid_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lin_num: torch.Tensor,
    lin_den: torch.Tensor,
    kv_block_index: torch.Tensor,
    kv_block_count: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    max_q_tile: int = 64,
    max_kv_block: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    """`selected_hybrid_attention` in plain PyTorch through the dense [B, H, S, S_kv] mask of the listed blocks; same
    arguments and result. Computes in fp32 (fp64 for fp64 inputs); differentiable in q, k, v, lin_num and lin_den
    (c's gradient through torch's amax, which splits it among exact ties)."""
    _check(q, k, v, lin_num, lin_den, kv_block_index, kv_block_count, q_offsets, kv_offsets, max_q_tile,
           max_kv_block)
    if int(kv_block_count.min()) < 1:
        raise ValueError("every query tile needs at least one listed key block (its row max sets the units of N, E)")
    allowed = listed_blocks_mask(q, k, kv_block_index, kv_block_count, q_offsets, kv_offsets, max_q_tile,
                                 max_kv_block)
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    scores = torch.einsum("bshd,bthd->bhst", q.to(dtype), k.to(dtype)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))  # [B, H, S, S_kv]
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp()
    numerator = torch.einsum("bhst,bthd->bshd", weights, v.to(dtype)) + lin_num.to(dtype)
    denominator = weights.sum(-1) + lin_den.to(dtype)  # [B, H, S]
    return (numerator / denominator.transpose(1, 2).unsqueeze(-1)).to(q.dtype)


__all__ = ["selected_hybrid_attention", "selected_hybrid_attention_reference"]
