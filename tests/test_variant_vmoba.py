import pytest
import torch

import surgery
from surgery.grid import VideoGrid
from surgery.variants.vmoba import (
    VideoMixtureOfBlockAttention,
    VMoBAConfig,
    select_blocks_threshold,
    select_blocks_topk,
)

from .conftest import model_inputs
from .test_variant_vsa import (
    HEAD_DIM,
    HEADS,
    full_attention,
    naive_block_ids,
    naive_masked_attention,
    naive_means,
    random_inputs,
    rel_err,
)

SMALL = dict(block_1d=2, block_2d=(2, 4), block_3d=(2, 2, 4), top_k=(1, 2, 4))


# ---- naive formulation: blocks from token coordinates, brute-force selection, fp64 ----------------
def naive_block_shape(partition, grid, config):
    """The spec's partitions: whole frames, patches over all frames, cubes."""
    return {"1d": (config.block_1d, grid.height, grid.width), "2d": (grid.frames, *config.block_2d),
            "3d": config.block_3d}[partition]


def brute_threshold(scores, own, tau):
    """Global threshold selection of one (batch, head), pair by pair. scores: [S][n] floats; own: [S]
    block of each query. Returns the kept (query, block) pairs."""
    values = [x for row in scores for x in row]
    low, high = min(values), max(values)
    weight = [[(x - low) / (high - low) if high > low else 0.0 for x in row] for row in scores]
    total = sum(w for row in weight for w in row)
    kept = {(s, own[s]) for s in range(len(scores))}
    share = sum(weight[s][b] for s, b in kept)
    others = [(s, b) for s in range(len(scores)) for b in range(len(scores[0])) if b != own[s]]
    for s, b in sorted(others, key=lambda pair: -weight[pair[0]][pair[1]]):  # stable: ties in raster order
        if share > tau * total:
            break
        kept.add((s, b))
        share += weight[s][b]
    return kept


def naive_vmoba(q, k, v, grid, block, config):
    """VMoBA written out: returns the output [B, S, H, D] and the token mask [B, H, S, S]."""
    ids, count = naive_block_ids(grid, block)
    scores = torch.einsum("bshd,bnhd->bhsn", q, naive_means(k, ids, count)).tolist()
    batch, tokens, heads, _ = q.shape
    block_mask = torch.zeros(batch, heads, tokens, count, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            if config.select == "threshold":
                for s, j in brute_threshold(scores[b][h], ids, config.threshold):
                    block_mask[b, h, s, j] = True
                continue
            top_k = config.top_k[{"1d": 0, "2d": 1, "3d": 2}[config.partition]]
            for s in range(tokens):
                others = sorted((j for j in range(count) if j != ids[s]), key=lambda j: -scores[b][h][s][j])
                for j in [ids[s], *others[: top_k - 1]]:
                    block_mask[b, h, s, j] = True
    mask = block_mask[..., ids]  # [B, H, S, S]: key token t allowed where its block is selected
    return naive_masked_attention(q, k, v, mask), mask


def vmoba_module(config, layer_index=0):
    return VideoMixtureOfBlockAttention(config, heads=HEADS, head_dim=HEAD_DIM, dim=HEADS * HEAD_DIM,
                                        layer_index=layer_index)


@pytest.mark.parametrize("select", ["topk", "threshold"])
@pytest.mark.parametrize("partition", ["1d", "2d", "3d"])
@pytest.mark.parametrize("shape", [(3, 5, 6), (5, 6, 7)])
def test_forward_and_gradients_match_naive(shape, partition, select):
    grid = VideoGrid(*shape)
    config = VMoBAConfig(partition=partition, select=select, **SMALL)
    q, k, v, _ = (t.requires_grad_() for t in random_inputs(grid))
    ours = vmoba_module(config).attend_reference(q, k, v, grid)
    naive, _ = naive_vmoba(q, k, v, grid, naive_block_shape(partition, grid, config), config)
    assert rel_err(ours, naive) <= 1e-10

    cotangent = torch.randn(ours.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for name, ours_grad, naive_grad in zip("qkv", torch.autograd.grad(ours, (q, k, v), cotangent),
                                          torch.autograd.grad(naive, (q, k, v), cotangent)):
        assert rel_err(ours_grad, naive_grad) <= 1e-10, name


@pytest.mark.parametrize("tau", [0.05, 0.25, 0.6, 0.95])
def test_threshold_selection_matches_brute_force(tau):
    g = torch.Generator().manual_seed(3)
    own = torch.randint(0, 5, (30,), generator=g)
    for scores in (torch.randn(2, 2, 30, 5, generator=g, dtype=torch.float64),
                   # small integers: ties in weight and exact sums exercise tie-breaking and the boundary
                   torch.randint(-2, 3, (2, 2, 30, 5), generator=g).double()):
        selected = select_blocks_threshold(scores, own, tau)
        for b in range(2):
            for h in range(2):
                kept = brute_threshold(scores[b, h].tolist(), own.tolist(), tau)
                assert set(map(tuple, selected[b, h].nonzero().tolist())) == kept


def test_threshold_keeps_the_shortest_prefix_reaching_tau():
    """The paper's definition, checked on the result: the kept pairs hold ≥ τ of the normalised
    weight, and without the weakest kept non-own pair they would hold ≤ τ."""
    scores = torch.randn(1, 1, 40, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    own = torch.arange(40) % 10
    weight = (scores - scores.min()) / (scores.max() - scores.min())
    is_own = torch.nn.functional.one_hot(own, 10).bool()
    for tau in (0.05, 0.3, 0.6):
        selected = select_blocks_threshold(scores, own, tau)
        kept_share = weight[selected].sum() / weight.sum()
        others = selected & ~is_own
        assert kept_share >= tau and selected.sum() < selected.numel()
        if others.any():
            assert kept_share - weight[others].min() / weight.sum() <= tau
        else:
            assert torch.equal(selected[0, 0], is_own)


def test_threshold_one_or_equal_scores_keep_everything():
    scores = torch.randn(2, 3, 20, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    own = torch.arange(20) % 4
    assert select_blocks_threshold(scores, own, 1.0).all()
    assert select_blocks_threshold(torch.zeros_like(scores), own, 0.25).all()


def test_own_block_is_kept_when_it_scores_worst():
    own = torch.arange(12) % 4
    scores = torch.rand(1, 2, 12, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    scores[..., torch.arange(12), own] = -10.0  # every query's own block is its worst
    is_own = torch.nn.functional.one_hot(own, 4).bool()
    assert torch.equal(select_blocks_topk(scores, own, 1), is_own.expand_as(scores))
    two = select_blocks_topk(scores, own, 2)
    assert (two & is_own).sum() == 24 and two.sum(-1).eq(2).all()
    assert (select_blocks_threshold(scores, own, 0.05) & is_own).sum() == 24


def test_own_block_attended_end_to_end():
    """Queries of frames 0–1 point away from their own block's keys: with top-1 they still attend only it."""
    grid = VideoGrid(4, 3, 3)
    g = torch.Generator().manual_seed(7)
    direction = torch.randn(HEADS, HEAD_DIM, generator=g, dtype=torch.float64)
    q_noise, k_noise = 0.1 * torch.randn(2, 1, grid.tokens, HEADS, HEAD_DIM, generator=g, dtype=torch.float64)
    first = torch.arange(grid.tokens) < 18  # block 0 of the 1D partition: frames 0 and 1
    q = direction + q_noise
    k = torch.where(first.view(1, -1, 1, 1), -direction, direction) + k_noise
    v = torch.randn(q.shape, generator=g, dtype=torch.float64)
    config = VMoBAConfig(partition="1d", select="topk", block_1d=2, top_k=(1, 1, 1))
    ours = vmoba_module(config).attend_reference(q, k, v, grid)
    within_own = full_attention(q[:, :18], k[:, :18], v[:, :18])
    assert rel_err(ours[:, :18], within_own) <= 1e-12


@pytest.mark.parametrize("partition", ["1d", "2d", "3d"])
def test_every_block_selected_is_full_attention(partition):
    grid = VideoGrid(5, 6, 7)
    q, k, v, _ = random_inputs(grid)
    every_block = VMoBAConfig(partition=partition, select="topk", **{**SMALL, "top_k": (99, 99, 99)})
    for config in (every_block, VMoBAConfig(partition=partition, select="threshold", threshold=1.0, **SMALL)):
        module = vmoba_module(config)
        assert rel_err(module.attend_reference(q, k, v, grid), full_attention(q, k, v)) <= 1e-12
        assert module.last_density == 1.0
    assert VideoMixtureOfBlockAttention.density(every_block, grid) == 1.0


def test_bf16_inputs_are_computed_in_fp32():
    grid = VideoGrid(3, 5, 6)
    module = vmoba_module(VMoBAConfig(partition="3d", **SMALL))
    q, k, v, _ = (t.bfloat16() for t in random_inputs(grid))
    ours = module.attend_reference(q, k, v, grid)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, module.attend_reference(q.float(), k.float(), v.float(), grid).bfloat16())


def test_partition_cycles_with_the_layer_unless_pinned():
    assert [vmoba_module(VMoBAConfig(), i).partition for i in range(6)] == ["1d", "2d", "3d"] * 2
    assert [vmoba_module(VMoBAConfig(partition="2d"), i).partition for i in range(3)] == ["2d"] * 3
    # The defaults cut Wan2.1-1.3B's 21×30×52 grid into 7, 24 and 72 whole blocks.
    grid = VideoGrid(21, 30, 52)
    config = VMoBAConfig(select="topk")
    assert config.block_shape("1d", grid) == (3, 30, 52) and config.block_shape("2d", grid) == (21, 5, 13)
    assert VideoMixtureOfBlockAttention.density(config, grid) == pytest.approx((2 / 7 + 6 / 24 + 18 / 72) / 3)


@pytest.mark.parametrize("shape", [(4, 4, 6), (6, 4, 6)])
@pytest.mark.parametrize("partition", ["1d", "2d", "3d"])
@pytest.mark.parametrize("select", ["topk", "threshold"])
def test_cost_model_counts_the_naive_implementation(shape, partition, select):
    """Grids the blocks divide, so that top-k's average-block-size count is exact; threshold mode
    takes its density from the module's own observation of the same call."""
    grid = VideoGrid(*shape)
    config = VMoBAConfig(partition=partition, select=select, block_1d=2, block_2d=(2, 3), block_3d=(2, 2, 3),
                         top_k=(1, 2, 3))
    q, k, v, _ = random_inputs(grid, batch=1)
    block = naive_block_shape(partition, grid, config)
    _, mask = naive_vmoba(q, k, v, grid, block, config)
    module = vmoba_module(config)
    module.attend_reference(q, k, v, grid)
    tokens, width, blocks, pairs = grid.tokens, HEADS * HEAD_DIM, naive_block_ids(grid, block)[1], int(mask.sum())
    expected = 4 * HEAD_DIM * pairs + tokens * width + 2 * tokens * blocks * width  # fine, mean keys, scores
    assert module.last_density == pytest.approx(pairs / (HEADS * tokens**2), rel=1e-12)
    observed = module.observed_config()
    assert VideoMixtureOfBlockAttention.flops(observed, grid, HEADS, HEAD_DIM) == pytest.approx(expected, rel=1e-12)


def test_threshold_cost_needs_expected_density_and_unpinned_cost_is_the_cycle_mean():
    grid = VideoGrid(21, 30, 52)
    with pytest.raises(ValueError, match="expected_density"):
        VideoMixtureOfBlockAttention.flops(VMoBAConfig(), grid, 12, 128)
    for config in (VMoBAConfig(expected_density=0.2), VMoBAConfig(select="topk", block_2d=(4, 4))):
        pinned = [VideoMixtureOfBlockAttention.flops(VMoBAConfig(**{**config.to_dict(), "partition": p}), grid, 12, 128)
                  for p in ("1d", "2d", "3d")]
        assert VideoMixtureOfBlockAttention.flops(config, grid, 12, 128) == pytest.approx(sum(pinned) / 3, rel=1e-12)


def test_observed_config_averages_the_densities_seen():
    grid = VideoGrid(3, 5, 6)
    module = vmoba_module(VMoBAConfig(**SMALL), layer_index=4)
    assert module.last_density is None and module.observed_config().expected_density is None
    densities = []
    for seed in (0, 1):
        module.attend_reference(*random_inputs(grid, seed=seed)[:3], grid)
        densities.append(module.last_density)
    observed = module.observed_config()
    assert observed.partition == "2d" and observed.expected_density == pytest.approx(sum(densities) / 2)
    assert VMoBAConfig.from_dict(observed.to_dict()) == observed  # as a plan stores it
    assert 0 < min(densities) and densities[0] != densities[1]


def test_runs_inside_the_tiny_model(tiny_model):
    blocks = dict(block_1d=2, block_2d=(4, 4), block_3d=(2, 4, 4))
    surgery.apply(tiny_model, VMoBAConfig(**blocks))
    surgery.apply(tiny_model, VMoBAConfig(select="topk", top_k=(1, 2, 3), **blocks),
                  filter_fn=lambda module, fqn: fqn == "blocks.3.attn1")
    grid = VideoGrid(6, 10, 10)
    out = tiny_model(**model_inputs(tiny_model, grid, batch=1)).sample
    assert torch.isfinite(out).all()
    processors = list(surgery.variant_processors(tiny_model).values())
    assert [p.partition for p in processors] == ["1d", "2d", "3d", "1d"]
    assert all(0 < p.last_density < 1 for p in processors)
    assert all(VideoMixtureOfBlockAttention.flops(p.observed_config(), grid, 2, 32) > 0 for p in processors)
