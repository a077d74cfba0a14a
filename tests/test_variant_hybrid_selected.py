"""`hybrid_selected`: checked in fp64 against a naive formulation that builds the softmax mask and the linear
term's complement as explicit [S, S] matrices (output and every gradient), against full attention when every
tile is selected, its complement sums against explicit masks under random selections, its cost model against
the matmuls it runs, its settings, and inside the tiny model."""

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import surgery
from surgery.grid import VideoGrid, block_layout
from surgery.plan import Plan
from surgery.variants import VARIANTS
from surgery.variants.hybrid_selected import (HybridSelectedAttention, HybridSelectedConfig, complement_sums,
                                              selection_matrix)

from .conftest import model_inputs
from .test_cli import assert_one_line_error, run
from .test_variant_linear import (assert_matches_naive, assert_no_token_by_token_tensor, linear_kernel_matrix, qkv,
                                  random_processor)
from .test_variant_vsa import full_attention, naive_block_ids, naive_means

HEADS, HEAD_DIM = 3, 8


def naive_softmax_mask(q, k, grid, tile, top_k):
    """[B, H, S, S]: query i may take exact softmax on key j when j's tile is among the top_k of i's tile by
    tile-mean scores (ties to the lower tile), from token coordinates and Python loops."""
    ids, count = naive_block_ids(grid, tile)
    batch, tokens, heads, head_dim = q.shape
    scores = torch.einsum("bihd,bjhd->bhij", naive_means(q, ids, count), naive_means(k, ids, count)).tolist()
    tokens_of = [torch.tensor([n for n in range(tokens) if ids[n] == b]) for b in range(count)]
    mask = torch.zeros(batch, heads, tokens, tokens, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(count):
                for j in sorted(range(count), key=lambda j: -scores[b][h][i][j])[:top_k]:
                    mask[b, h, tokens_of[i][:, None], tokens_of[j]] = True
    return mask


def naive_hybrid_selected(processor, grid):
    """The formula on explicit [B, H, S, S] weights: exp(s − c) on the selected keys, φ_q·φ_k on the rest."""
    config = processor.config

    def attend(q, k, v):
        mask = naive_softmax_mask(q, k, grid, config.tile, config.top_k)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
        row_max = scores.masked_fill(~mask, float("-inf")).amax(dim=-1, keepdim=True)
        softmax_weights = (scores - row_max).masked_fill(~mask, float("-inf")).exp()
        linear_weights = linear_kernel_matrix(processor, q, k).masked_fill(mask, 0.0)
        weights = softmax_weights + linear_weights
        return torch.einsum("bhij,bjhd->bihd", weights, v) / weights.sum(-1).transpose(1, 2).unsqueeze(-1)

    return attend


@pytest.mark.parametrize(
    "grid, tile, batch, config",
    [
        (VideoGrid(3, 5, 6), (2, 2, 4), 2, HybridSelectedConfig(tile=(2, 2, 4), top_k=3)),
        (VideoGrid(4, 4, 6), (2, 2, 2), 1, HybridSelectedConfig(tile=(2, 2, 2), top_k=1, hidden_dim=3)),
        (VideoGrid(5, 6, 7), (4, 4, 4), 2, HybridSelectedConfig(top_k=5, feature_dim=5)),
        (VideoGrid(3, 5, 6), (2, 2, 4), 1, HybridSelectedConfig(tile=(2, 2, 4), top_k=2, kind="polynomial")),
    ],
    ids=["3x5x6-partial-k3", "4x4x6-exact-k1-hidden", "5x6x7-t4-k5", "3x5x6-k2-polynomial"],
)
def test_matches_explicit_formula_fp64(grid, tile, batch, config):
    processor = random_processor(HybridSelectedAttention, config, HEADS, HEAD_DIM)
    assert_matches_naive(processor, naive_hybrid_selected(processor, grid), grid, batch, HEADS, HEAD_DIM)


def test_every_tile_selected_is_full_attention():
    grid = VideoGrid(3, 5, 6)
    processor = random_processor(HybridSelectedAttention, HybridSelectedConfig(tile=(2, 2, 4), top_k=99), HEADS,
                                 HEAD_DIM)
    q, k, v = qkv(2, grid, HEADS, HEAD_DIM)
    assert float((processor.attend_reference(q, k, v, grid) - full_attention(q, k, v)).abs().max()) <= 1e-12
    assert HybridSelectedAttention.density(processor.config, grid) == 1.0


@pytest.mark.parametrize("tile_order", [False, True], ids=["raster", "tile-order"])
def test_complement_sums_match_explicit_masks_under_random_selections(tile_order):
    """Σ over each query's unselected keys of φ_q·φ_k [v, 1], with the selection drawn at random."""
    g = torch.Generator().manual_seed(0)
    grid, tile, batch = VideoGrid(3, 5, 6), (2, 2, 4), 2
    layout = block_layout(grid, tile)
    n, S = layout.num_blocks, grid.tokens
    phi_q, phi_k = (torch.rand(batch, S, HEADS, 6, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(batch, S, HEADS, HEAD_DIM, generator=g, dtype=torch.float64)
    selected = (torch.rand(batch, HEADS, n, n, generator=g) < 0.4).double()
    numerator, denominator = complement_sums(phi_q, phi_k, v, selected, layout, tile_order)
    tile_of = layout.block_of_token
    if tile_order:  # position p holds raster token order[p]
        tile_of = tile_of[layout.order]
    complement = 1.0 - selected[:, :, tile_of][..., tile_of]  # [B, H, S, S]
    weights = torch.einsum("bihf,bjhf->bhij", phi_q, phi_k) * complement
    assert torch.allclose(numerator, torch.einsum("bhij,bjhd->bihd", weights, v), rtol=1e-12, atol=1e-12)
    assert torch.allclose(denominator, weights.sum(-1).transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_never_forms_a_token_by_token_matrix():
    processor = HybridSelectedAttention(HybridSelectedConfig(tile=(2, 2, 4), top_k=2), heads=2, head_dim=8, dim=16)
    assert_no_token_by_token_tensor(processor, VideoGrid(3, 5, 6), 2, 8)


def test_selection_matrix_marks_the_listed_tiles():
    key_tiles = torch.tensor([[[[2, 0], [1, 3]]]])
    assert selection_matrix(key_tiles, 4, torch.float32).tolist() == [[[[1, 0, 1, 0], [0, 1, 0, 1]]]]


@pytest.mark.parametrize("config", [HybridSelectedConfig(tile=(2, 2, 2), top_k=3),
                                    HybridSelectedConfig(tile=(2, 3, 4), sparsity=0.5, feature_dim=4, hidden_dim=2),
                                    HybridSelectedConfig(tile=(2, 2, 2), top_k=2, kind="polynomial", degree=3)])
def test_cost_model_counts_the_pairs_and_the_matmuls(config):
    """On a grid the tile shape divides: 4·D per exactly attended pair, the tile means and their scores, and the
    matmuls that the feature maps and the complement sums run."""
    grid = VideoGrid(4, 6, 8)
    processor = HybridSelectedAttention(config, heads=HEADS, head_dim=HEAD_DIM, dim=HEADS * HEAD_DIM).double()
    q, k, v = qkv(1, grid, HEADS, HEAD_DIM)
    tiles = block_layout(grid, config.tile).num_blocks
    kept = config.tiles_kept(tiles)
    pairs = int(naive_softmax_mask(q, k, grid, config.tile, kept).sum())
    layout = block_layout(grid, config.tile)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        selected = torch.rand(1, HEADS, tiles, tiles, dtype=torch.float64)
        complement_sums(processor.feature_map_q(q), processor.feature_map_k(k), v, selected, layout, False)
    tokens, width = grid.tokens, HEADS * HEAD_DIM
    key_sums = 2 * HEADS * tokens * config.feature_count(HEAD_DIM)  # Σφ_k(k) per tile: a sum, the model's matmul
    expected = (4 * HEAD_DIM * pairs + 2 * tokens * width + 2 * HEADS * tiles**2 * HEAD_DIM + counter.get_total_flops()
                + key_sums)
    assert HybridSelectedAttention.flops(config, grid, HEADS, HEAD_DIM) == pytest.approx(expected, rel=1e-12)
    assert HybridSelectedAttention.density(config, grid) == pytest.approx(pairs / (HEADS * tokens**2), rel=1e-12)


def test_cost_falls_with_sparsity_and_keeps_linear_cost_at_wan_scale():
    grid, heads, head_dim = VideoGrid(21, 30, 52), 12, 128
    costs = [HybridSelectedAttention.flops(HybridSelectedConfig(sparsity=s), grid, heads, head_dim)
             for s in (0.0, 0.5, 0.75, 0.875)]
    assert costs == sorted(costs, reverse=True)
    dense = 4 * heads * grid.tokens**2 * head_dim
    assert 0.12 < costs[-1] / dense < 0.2  # 12.5% of tiles exact, plus the linear term and the selection


@pytest.mark.parametrize("params, fragment", [
    ({"top_k": 0}, "top_k must be ≥ 1"),
    ({"sparsity": 1.0}, "sparsity must be in [0, 1)"),
    ({"sparsity": -0.1}, "sparsity must be in [0, 1)"),
    ({"top_k": 4, "sparsity": 0.5}, "set exactly one of top_k and sparsity"),
    ({}, "set exactly one of top_k and sparsity"),
    ({"top_k": 4, "feature_dim": 0}, "feature_dim must be an int ≥ 1"),
])
def test_bad_settings_are_one_line_errors(params, fragment):
    with pytest.raises(surgery.SurgeryError) as error:
        HybridSelectedConfig.from_dict(params)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_bad_settings_in_a_plan_exit_2(tiny_model, tmp_path):
    plan = Plan.uniform("tiny", tiny_model.config, "hybrid_selected", {"top_k": 2}).to_dict()
    for choice in plan["layers"].values():
        choice["params"]["top_k"] = 0
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert_one_line_error(run("export", "--model", "tiny", "--plan", str(tmp_path / "plan.json"), "--out",
                              str(tmp_path / "out")), "top_k must be ≥ 1")


def test_config_round_trips_and_is_registered():
    config = HybridSelectedConfig(tile=(2, 4, 4), sparsity=0.75, feature_dim=16, hidden_dim=8)
    assert HybridSelectedConfig.from_dict(config.to_dict()) == config
    assert VARIANTS["hybrid_selected"] is HybridSelectedAttention
    assert not HybridSelectedAttention.training_free
    assert [HybridSelectedConfig.from_dict(p).sparsity for p in HybridSelectedAttention.plan_candidates] == \
        [0.5, 0.75, 0.875]


def test_runs_inside_the_tiny_model_and_trains_its_feature_maps(tiny_model):
    surgery.apply(tiny_model, HybridSelectedConfig(sparsity=0.75))
    processors = surgery.variant_processors(tiny_model)
    assert len(processors) == 4 and all(isinstance(p, HybridSelectedAttention) for p in processors.values())
    out = tiny_model(**model_inputs(tiny_model, VideoGrid(6, 10, 10), batch=1)).sample
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.feature_map_k.weight.grad.abs().sum() > 0 for p in processors.values())

