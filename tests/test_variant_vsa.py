import math

import pytest
import torch

import surgery
from surgery.grid import VideoGrid
from surgery.variants.vsa import VideoSparseAttention, VSAConfig

from .conftest import model_inputs

HEADS, HEAD_DIM = 3, 8


# ---- naive formulation: tiles from token coordinates, explicit [S, S] masks, fp64 ----------------
def naive_block_ids(grid: VideoGrid, block) -> tuple[list[int], int]:
    """Block id of each raster token from its (t, h, w), and the block count; edge blocks partial."""
    bt, bh, bw = block
    nh, nw = math.ceil(grid.height / bh), math.ceil(grid.width / bw)
    ids = []
    for n in range(grid.tokens):
        t, rest = divmod(n, grid.height * grid.width)
        h, w = divmod(rest, grid.width)
        ids.append(((t // bt) * nh + h // bh) * nw + w // bw)
    return ids, math.ceil(grid.frames / bt) * nh * nw


def naive_means(x, ids, count):
    """[B, S, H, D] → [B, count, H, D]: the mean over each block's tokens, via a membership matrix."""
    members = torch.zeros(count, len(ids), dtype=x.dtype)
    for n, b in enumerate(ids):
        members[b, n] = 1.0
    return torch.einsum("cs,bshd->bchd", members / members.sum(1, keepdim=True), x)


def naive_masked_attention(q, k, v, mask):
    """Softmax(q·kᵀ/√D) over the keys allowed by mask [B, H, S, S]; q, k, v [B, S, H, D]."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)


def full_attention(q, k, v):
    bhsd = [t.transpose(1, 2) for t in (q, k, v)]
    return torch.nn.functional.scaled_dot_product_attention(*bhsd).transpose(1, 2)


def rel_err(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def naive_vsa(q, k, v, x, weight, bias, grid, tile, top_k):
    """VSA written out: returns the output [B, S, H, D] and the fine stage's token mask [B, H, S, S]."""
    ids, count = naive_block_ids(grid, tile)
    batch, tokens, heads, head_dim = q.shape
    q_tiles, k_tiles, v_tiles = (naive_means(t, ids, count) for t in (q, k, v))
    probs = (torch.einsum("bihd,bjhd->bhij", q_tiles, k_tiles) / math.sqrt(head_dim)).softmax(-1)
    coarse = torch.einsum("bhij,bjhd->bihd", probs, v_tiles)
    mask = torch.zeros(batch, heads, tokens, tokens, dtype=torch.bool)
    tokens_of = [torch.tensor([n for n in range(tokens) if ids[n] == b]) for b in range(count)]
    rows = probs.tolist()
    for b in range(batch):
        for h in range(heads):
            for i in range(count):
                ranked = sorted(range(count), key=lambda j: -rows[b][h][i][j])  # stable: ties → lower j
                for j in ranked[:top_k]:
                    mask[b, h, tokens_of[i][:, None], tokens_of[j]] = True
    gate = (x @ weight.T + bias).view(batch, tokens, heads, head_dim)
    return naive_masked_attention(q, k, v, mask) + gate * coarse[:, ids], mask


def random_inputs(grid, batch=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, grid.tokens, HEADS, HEAD_DIM)
    q, k, v = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))
    x = torch.randn(batch, grid.tokens, HEADS * HEAD_DIM, generator=g, dtype=dtype)
    return q, k, v, x


def vsa_module(config, gate_seed=None):
    module = VideoSparseAttention(config, heads=HEADS, head_dim=HEAD_DIM, dim=HEADS * HEAD_DIM).double()
    if gate_seed is not None:
        g = torch.Generator().manual_seed(gate_seed)
        with torch.no_grad():
            module.gate_compress.weight.copy_(torch.randn(module.gate_compress.weight.shape, generator=g) * 0.2)
            module.gate_compress.bias.copy_(torch.randn(module.gate_compress.bias.shape, generator=g))
    return module


# 5×6×7 with 4×4×4 tiles has 2×2×2 tiles, all partial but one dimension; 3×5×6 with 2×2×2 has 2×3×3.
CASES = [((5, 6, 7), (4, 4, 4), 3), ((3, 5, 6), (2, 2, 2), 4), ((3, 5, 6), (2, 2, 2), 1)]


@pytest.mark.parametrize("shape,tile,top_k", CASES, ids=["5x6x7-t4-k3", "3x5x6-t2-k4", "3x5x6-t2-k1"])
def test_forward_and_gradients_match_naive(shape, tile, top_k):
    grid = VideoGrid(*shape)
    module = vsa_module(VSAConfig(tile=tile, top_k=top_k), gate_seed=1)
    q, k, v, x = (t.requires_grad_() for t in random_inputs(grid))
    weight, bias = module.gate_compress.weight, module.gate_compress.bias
    ours = module.attend_reference(q, k, v, grid, x)
    naive, _ = naive_vsa(q, k, v, x, weight, bias, grid, tile, top_k)
    assert rel_err(ours, naive) <= 1e-10

    cotangent = torch.randn(ours.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    inputs = (q, k, v, x, weight, bias)
    grads = torch.autograd.grad(ours, inputs, cotangent)
    naive_grads = torch.autograd.grad(naive, inputs, cotangent)
    for name, ours_grad, naive_grad in zip("q k v x weight bias".split(), grads, naive_grads):
        assert rel_err(ours_grad, naive_grad) <= 1e-10, name


def test_gate_starts_at_zero_so_output_is_fine_only():
    grid = VideoGrid(3, 5, 6)
    module = vsa_module(VSAConfig(tile=(2, 2, 2), top_k=2))
    assert not module.gate_compress.weight.any() and not module.gate_compress.bias.any()
    q, k, v, x = random_inputs(grid)
    zeros = torch.zeros(HEADS * HEAD_DIM, HEADS * HEAD_DIM, dtype=torch.float64)
    _, mask = naive_vsa(q, k, v, x, zeros, zeros[0], grid, (2, 2, 2), 2)
    assert rel_err(module.attend_reference(q, k, v, grid, x), naive_masked_attention(q, k, v, mask)) <= 1e-10


def test_every_tile_kept_with_zero_gate_is_full_attention():
    grid = VideoGrid(5, 6, 7)
    q, k, v, x = random_inputs(grid)
    for config in (VSAConfig(top_k=8), VSAConfig(top_k=100), VSAConfig(sparsity=0.0)):
        assert rel_err(vsa_module(config).attend_reference(q, k, v, grid, x), full_attention(q, k, v)) <= 1e-12


def test_bf16_inputs_are_computed_in_fp32():
    grid = VideoGrid(3, 5, 6)
    module = vsa_module(VSAConfig(tile=(2, 2, 2), top_k=3), gate_seed=1).float()
    q, k, v, x = (t.bfloat16() for t in random_inputs(grid))
    ours = module.attend_reference(q, k, v, grid, x)
    in_fp32 = module.attend_reference(q.float(), k.float(), v.float(), grid, x.float())
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, in_fp32.bfloat16())


def test_config_takes_exactly_one_of_top_k_and_sparsity():
    assert VSAConfig(sparsity=0.9).tiles_kept(624) == 63  # ceil(0.1 · 624), FastVideo's rule
    assert VSAConfig(sparsity=0.999).tiles_kept(624) == 1 and VSAConfig(top_k=900).tiles_kept(624) == 624
    for bad in (dict(), dict(top_k=4, sparsity=0.5), dict(top_k=0), dict(sparsity=1.0), dict(top_k=4, tile=(4, 0, 4))):
        with pytest.raises(ValueError):
            VSAConfig(**bad)
    stored = VSAConfig(tile=(2, 4, 4), sparsity=0.5)
    assert VSAConfig.from_dict(stored.to_dict()) == stored  # as a plan stores it
    with pytest.raises(surgery.SurgeryError, match="top_k"):
        VSAConfig.from_dict({"top_k": 2, "sparsity": 0.5})


@pytest.mark.parametrize("shape,tile,top_k", [((4, 4, 6), (2, 2, 2), 5), ((2, 6, 8), (2, 3, 4), 3),
                                              ((5, 6, 7), (4, 4, 4), 8)])
def test_cost_model_counts_the_naive_implementation(shape, tile, top_k):
    """Divisible grids, or every tile kept, so that the average-tile-size count is exact."""
    grid = VideoGrid(*shape)
    q, k, v, x = random_inputs(grid, batch=1)
    zeros = torch.zeros(HEADS * HEAD_DIM, HEADS * HEAD_DIM, dtype=torch.float64)
    _, mask = naive_vsa(q, k, v, x, zeros, zeros[0], grid, tile, top_k)
    tiles = naive_block_ids(grid, tile)[1]
    tokens, width = grid.tokens, HEADS * HEAD_DIM
    pairs = int(mask.sum())
    expected = (
        4 * HEAD_DIM * pairs  # fine QKᵀ and PV over the attended pairs, all heads
        + 3 * tokens * width  # pooling q, k, v
        + 4 * HEADS * tiles**2 * HEAD_DIM  # coarse attention
        + 2 * tokens * width * width + 3 * tokens * width  # gate projection, bias, gate ⊙ coarse + fine
    )
    config = VSAConfig(tile=tile, top_k=top_k)
    assert VideoSparseAttention.flops(config, grid, HEADS, HEAD_DIM) == pytest.approx(expected, rel=1e-12)
    assert VideoSparseAttention.density(config, grid) == pytest.approx(pairs / (HEADS * tokens**2), rel=1e-12)


def test_runs_inside_the_tiny_model_and_trains_the_gate(tiny_model):
    surgery.apply(tiny_model, VSAConfig(sparsity=0.5))
    processors = surgery.variant_processors(tiny_model)
    assert all(isinstance(p, VideoSparseAttention) for p in processors.values()) and len(processors) == 4
    out = tiny_model(**model_inputs(tiny_model, VideoGrid(6, 10, 10), batch=1)).sample
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.gate_compress.weight.grad.abs().sum() > 0 for p in processors.values())
