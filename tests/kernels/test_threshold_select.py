"""The sort-free threshold selection (Triton) against the spec, `variants.vmoba.select_blocks_threshold`.

On CPU the kernels run in Triton's interpreter (tests/kernels/__init__.py). The two must keep the same pairs:
both sum in fp64, in different orders, which could only move the boundary where τ·Σw lies within fp64
rounding of a prefix sum (not on these inputs).
"""

import pytest
import torch

from surgery.kernels import threshold_select
from surgery.kernels.threshold_select import select_threshold_blocks
from surgery.variants.vmoba import select_blocks_threshold, threshold_weights

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def cases(generator, tokens, blocks):
    yield "normal", torch.randn(2, 2, tokens, blocks, generator=generator)
    # Small integers: many ties in weight (spread over several chunks) and sums landing exactly on τ.
    yield "ties", torch.randint(-2, 3, (2, 2, tokens, blocks), generator=generator).float()
    # One head whose own-block pairs hold most of the weight: at small τ nothing else is kept.
    own_heavy = torch.rand(1, 1, tokens, blocks, generator=generator) * 0.01
    yield "own-heavy", own_heavy


CHUNK = 1024  # pairs per program here: the second case spans three chunks


def searched(scores, own, tau):
    return select_threshold_blocks(scores, own, tau, chunk=CHUNK)


@pytest.mark.parametrize("tokens,blocks", [(30, 5), (300, 8)], ids=["one-chunk", "several-chunks"])
@pytest.mark.parametrize("tau", [0.0, 0.25, 0.95, 1.0])
def test_matches_the_spec(tokens, blocks, tau):
    g = torch.Generator().manual_seed(tokens * 7 + int(tau * 100))
    own = torch.randint(0, blocks, (tokens,), generator=g)
    for name, scores in cases(g, tokens, blocks):
        if name == "own-heavy":
            scores[..., torch.arange(tokens), own] = 1.0
        scores = scores.to(DEVICE)
        expected = select_blocks_threshold(scores, own.to(DEVICE), tau)
        assert torch.equal(searched(scores, own.to(DEVICE), tau), expected), name
    assert tokens * blocks <= CHUNK or tokens * blocks > 2 * CHUNK, "the second case must span several chunks"


@pytest.mark.parametrize("tokens,blocks", [(30, 5), (300, 8)], ids=["one-chunk", "several-chunks"])
def test_weights_equal_the_specs(tokens, blocks):
    """The one-pass weights bit for bit (the search ranks their fp32 bits), the own pairs' sum to fp64 rounding."""
    g = torch.Generator().manual_seed(tokens)
    own = torch.randint(0, blocks, (tokens,), generator=g).to(DEVICE)
    for name, scores in cases(g, tokens, blocks):
        weights, own_weight = threshold_select.threshold_weights(scores.to(DEVICE), own, chunk=CHUNK)
        expected, expected_own = threshold_weights(scores.to(DEVICE), own)
        assert torch.equal(weights, expected.flatten(0, 1)), name
        torch.testing.assert_close(own_weight, expected_own.flatten(), rtol=1e-15, atol=0)


def test_rejects_scores_that_are_not_fp32():
    with pytest.raises(ValueError, match="must be float32"):
        select_threshold_blocks(torch.zeros(1, 1, 4, 2, dtype=torch.float64), torch.zeros(4, dtype=torch.long), 0.5)


def test_equal_scores_keep_everything():
    own = torch.arange(40, device=DEVICE) % 6
    assert searched(torch.full((1, 2, 40, 6), 3.0, device=DEVICE), own, 0.25).all()


@gpu
@needs_cuda
def test_gpu_wan_3d_layer_shape():
    """Wan2.1-1.3B's 3D layer: 32,760 queries × 72 blocks per head, 12 heads, τ = 0.25; same pairs as the spec."""
    g = torch.Generator(device="cuda").manual_seed(7)
    scores = torch.randn(1, 12, 32760, 72, device="cuda", generator=g)
    own = torch.randint(0, 72, (32760,), device="cuda", generator=g)
    expected = select_blocks_threshold(scores, own, 0.25)
    assert torch.equal(searched(scores, own, 0.25), expected)
    weights = threshold_select.threshold_weights(scores, own)[0]
    assert torch.equal(weights, threshold_weights(scores, own)[0].flatten(0, 1))
