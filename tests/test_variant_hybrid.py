"""`hybrid`: checked against an explicit S×S formulation in fp64 (output and every gradient), against
full attention at R = 1, its FLOP count against the matmuls torch actually runs, and inside the tiny model."""

import math

import pytest
import torch

import surgery
from surgery.errors import SurgeryError
from surgery.grid import VideoGrid
from surgery.variants import VARIANTS
from surgery.variants.hybrid import (HybridAttention, HybridConfig, linear_token_index, linear_tokens,
                                     softmax_token_count, split_tokens)

from .conftest import model_inputs
from .test_variant_linear import (
    WAN_GRID,
    assert_flops_equal_counted_matmuls,
    assert_matches_naive,
    assert_no_token_by_token_tensor,
    linear_kernel_matrix,
    qkv,
    random_processor,
    relative_error,
)


def naive_hybrid(processor, rate):
    """The hybrid formula on explicit [B, H, S, S] matrices: masked softmax weights plus φ_q·φ_k weights."""

    def attend(q, k, v):
        tokens = q.shape[1]
        is_softmax_key = torch.arange(tokens) % rate == 0  # [S]
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])  # [B, H, S, S]
        row_max = scores.masked_fill(~is_softmax_key, float("-inf")).amax(dim=-1, keepdim=True)
        softmax_weights = (scores - row_max).masked_fill(~is_softmax_key, float("-inf")).exp()
        linear_weights = linear_kernel_matrix(processor, q, k).masked_fill(is_softmax_key, 0.0)
        weights = softmax_weights + linear_weights  # unscaled linear term: the max softmax weight is 1
        return torch.einsum("bhij,bjhd->bihd", weights, v) / weights.sum(-1).transpose(1, 2).unsqueeze(-1)

    return attend


@pytest.mark.parametrize(
    "grid, batch, heads, head_dim, config",
    [
        (VideoGrid(3, 5, 7), 2, 3, 8, HybridConfig(rate=2)),
        (VideoGrid(3, 5, 7), 2, 2, 8, HybridConfig(rate=4, hidden_dim=3)),
        (VideoGrid(2, 3, 4), 2, 2, 6, HybridConfig(rate=5, feature_dim=5, hidden_dim=4)),
        (VideoGrid(2, 3, 4), 1, 2, 6, HybridConfig(rate=24)),
        (VideoGrid(1, 2, 3), 2, 2, 4, HybridConfig(rate=8)),
        (VideoGrid(2, 3, 4), 2, 2, 6, HybridConfig(rate=1)),
        (VideoGrid(3, 5, 7), 2, 2, 8, HybridConfig(rate=4, kind="polynomial")),
    ],
    ids=["3x5x7-R2", "3x5x7-R4-hidden", "2x3x4-R5", "one-softmax-key", "rate-above-tokens", "R1", "R4-polynomial"],
)
def test_hybrid_matches_explicit_formula_fp64(grid, batch, heads, head_dim, config):
    processor = random_processor(HybridAttention, config, heads, head_dim)
    assert_matches_naive(processor, naive_hybrid(processor, config.rate), grid, batch, heads, head_dim)


def test_rate_one_is_full_attention():
    grid, heads, head_dim = VideoGrid(3, 5, 7), 3, 8
    processor = random_processor(HybridAttention, HybridConfig(rate=1), heads, head_dim)
    q, k, v = qkv(2, grid, heads, head_dim)
    probs = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(head_dim), dim=-1)
    full = torch.einsum("bhij,bjhd->bihd", probs, v)
    assert relative_error(processor.attend_reference(q, k, v, grid), full) <= 1e-12


def test_softmax_tokens_are_every_rth_raster_index():
    assert linear_token_index(24, 5, torch.device("cpu")).tolist() == [
        n for n in range(24) if n not in (0, 5, 10, 15, 20)
    ]
    assert [softmax_token_count(105, r) for r in (1, 2, 4, 8, 105, 200)] == [105, 53, 27, 14, 1, 1]
    assert HybridAttention.density(HybridConfig(rate=4), VideoGrid(3, 5, 7)) == 27 / 105
    assert HybridAttention.density(HybridConfig(rate=4), WAN_GRID) == 8190 / 32760


@pytest.mark.parametrize("tokens,rate", [(24, 5), (25, 5), (26, 5), (24, 4), (3, 8), (9, 8)])
def test_linear_tokens_gathers_the_linear_index_with_its_gradient(tokens, rate):
    x = torch.randn(2, tokens, 3, 4, requires_grad=True)
    index = linear_token_index(tokens, rate, torch.device("cpu"))
    gathered = linear_tokens(x, rate)
    assert torch.equal(gathered, x.index_select(1, index))
    grad = torch.randn_like(gathered)
    (expected,) = torch.autograd.grad(x.index_select(1, index), x, grad)
    (got,) = torch.autograd.grad(gathered, x, grad)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("tokens,rate", [(24, 5), (25, 5), (26, 5), (24, 4), (3, 8), (9, 8)])
def test_split_tokens_gives_both_parts_with_one_gradient(tokens, rate):
    x = torch.randn(2, tokens, 3, 4, requires_grad=True)
    index = linear_token_index(tokens, rate, torch.device("cpu"))
    soft, lin = split_tokens(x, rate)
    assert torch.equal(soft, x[:, ::rate]) and torch.equal(lin, x.index_select(1, index))
    grad_soft, grad_lin = torch.randn_like(soft), torch.randn_like(lin)
    (expected,) = torch.autograd.grad([x[:, ::rate], x.index_select(1, index)], x, [grad_soft, grad_lin])
    (got,) = torch.autograd.grad([soft, lin], x, [grad_soft, grad_lin])
    assert torch.equal(got, expected)
    (only_linear,) = torch.autograd.grad(split_tokens(x, rate)[1], x, grad_lin)
    assert torch.equal(only_linear[:, ::rate], torch.zeros_like(soft))


def test_bf16_inputs_and_parameters_are_summed_in_fp32():
    grid, heads, head_dim = VideoGrid(2, 3, 5), 2, 8
    processor = random_processor(HybridAttention, HybridConfig(rate=3, hidden_dim=3), heads, head_dim)
    processor = processor.to(torch.bfloat16)
    q, k, v = (t.detach().to(torch.bfloat16) for t in qkv(2, grid, heads, head_dim))
    out = processor.attend_reference(q, k, v, grid)
    assert out.dtype == torch.bfloat16
    # bf16 → fp32 is exact, so a computation that sums in fp32 matches this one bit for bit.
    in_fp32 = processor.float().attend_reference(q.float(), k.float(), v.float(), grid)
    assert torch.equal(out, in_fp32.to(torch.bfloat16))
    exact = naive_hybrid(processor.double(), 3)(q.double(), k.double(), v.double())
    assert relative_error(out.double(), exact) <= 1e-2


@pytest.mark.parametrize(
    "config", [HybridConfig(rate=1), HybridConfig(rate=3), HybridConfig(rate=8, feature_dim=24, hidden_dim=16)],
    ids=["R1", "R3", "R8-hidden"],
)
def test_hybrid_flops_equal_counted_matmuls(config):
    assert_flops_equal_counted_matmuls(HybridAttention, config)


def test_hybrid_flops_by_hand_for_wan_1_3b():
    # R = 4 on 32,760 tokens: 8,190 softmax keys, 24,570 linear keys; 12 heads × 128, F = 128.
    softmax_branch = 4 * 12 * 32760 * 8190 * 128
    linear_branch = 2 * 12 * (32760 + 24570) * (128 * 128 + 256 * 129)
    assert HybridAttention.flops(HybridConfig(rate=4), WAN_GRID, 12, 128) == softmax_branch + linear_branch
    assert HybridAttention.flops(HybridConfig(rate=1), WAN_GRID, 12, 128) == 4 * 12 * 32760**2 * 128


def test_hybrid_never_forms_a_token_by_token_matrix():
    processor = HybridAttention(HybridConfig(rate=2), heads=2, head_dim=8, dim=16)
    assert_no_token_by_token_tensor(processor, VideoGrid(2, 4, 5), 2, 8)


@pytest.mark.parametrize("rate", [0, -2, 1.5, True, "4"])
def test_bad_rates_are_refused(rate):
    with pytest.raises(ValueError, match="rate must be an int ≥ 1"):
        HybridConfig(rate=rate)


def test_hybrid_config_round_trips_and_checks_feature_sizes():
    config = HybridConfig(rate=8, feature_dim=16, hidden_dim=8)
    assert HybridConfig.from_dict(config.to_dict()) == config
    assert VARIANTS["hybrid"] is HybridAttention
    assert [HybridConfig.from_dict(p).rate for p in HybridAttention.plan_candidates] == [2, 4, 8]
    with pytest.raises(ValueError, match="hidden_dim must be an int ≥ 0"):
        HybridConfig(rate=2, hidden_dim=-1)
    with pytest.raises(SurgeryError, match="rate must be an int"):
        HybridConfig.from_dict({"rate": 0})


def test_hybrid_runs_inside_the_tiny_model(tiny_model):
    surgery.apply(tiny_model, HybridConfig(rate=4))
    processors = surgery.variant_processors(tiny_model)
    assert len(processors) == 4 and all(isinstance(p, HybridAttention) for p in processors.values())
    assert "blocks.0.attn1.processor.feature_map_q.bias" in tiny_model.state_dict()
    with torch.no_grad():
        out = tiny_model(**model_inputs(tiny_model, VideoGrid(6, 10, 10), batch=1)).sample
    assert out.shape == (1, 16, 6, 20, 20) and torch.isfinite(out).all()
