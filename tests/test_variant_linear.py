"""`linear`: checked against an explicit S×S formulation in fp64 (output and every gradient), its
FLOP count against the matmuls torch actually runs, and inside the tiny model.

Helpers here (naive feature map, comparisons, FLOP and shape recorders) are shared with
test_variant_hybrid.py.
"""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import surgery
from surgery.errors import SurgeryError
from surgery.grid import VideoGrid
from surgery.variants import VARIANTS
from surgery.variants.linear import LinearAttention, LinearConfig

from .conftest import model_inputs

WAN_GRID = VideoGrid(21, 30, 52)  # 81 frames at 480×832: 32,760 tokens


# ---- shared helpers ---------------------------------------------------------------------------
def random_processor(cls, config, heads, head_dim):
    """A processor in fp64 whose feature-map parameters are all random (init has zeros and an identity)."""
    processor = cls(config, heads=heads, head_dim=head_dim, dim=heads * head_dim).double()
    with torch.no_grad():
        for p in processor.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    return processor


def qkv(batch, grid, heads, head_dim, dtype=torch.float64):
    return [torch.randn(batch, grid.tokens, heads, head_dim, dtype=dtype, requires_grad=True) for _ in range(3)]


def naive_feature_map(feature_map, x):
    """φ(x) written head by head with plain matmuls. x: [B, S, H, D] → [B, S, H, 2F], or [B, S, H, P·F] for the
    polynomial: its P slices of ψ raised to the powers 1 … P, side by side."""
    per_head = []
    for h in range(x.shape[2]):
        x_h = x[:, :, h]  # [B, S, D]
        psi = x_h @ feature_map.weight[h] + feature_map.bias[h]
        if feature_map.hidden_dim:
            hidden = F.gelu(x_h @ feature_map.hidden_weight[h] + feature_map.hidden_bias[h])
            psi = psi + hidden @ feature_map.hidden_out[h]
        if feature_map.kind == "polynomial":
            width = psi.shape[-1] // feature_map.degree
            powers = [psi[..., (p - 1) * width: p * width] ** p for p in range(1, feature_map.degree + 1)]
            per_head.append(torch.cat(powers, dim=-1))
        else:
            per_head.append(torch.softmax(torch.cat([psi, -psi], dim=-1), dim=-1))
    return torch.stack(per_head, dim=2)


def linear_kernel_matrix(processor, q, k):
    """Every pair's linear weight φ_q(q_i)·φ_k(k_j): [B, H, S, S]."""
    phi_q, phi_k = naive_feature_map(processor.feature_map_q, q), naive_feature_map(processor.feature_map_k, k)
    return torch.einsum("bihf,bjhf->bhij", phi_q, phi_k)


def relative_error(ours, reference):
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def assert_matches_naive(processor, naive, grid, batch, heads, head_dim, tol=1e-10):
    """Output and gradients (q, k, v, every parameter) of `attend_reference` vs `naive(q, k, v)`, fp64."""
    q, k, v = qkv(batch, grid, heads, head_dim)
    params = dict(processor.named_parameters())
    inputs = [q, k, v, *params.values()]
    ours, reference = processor.attend_reference(q, k, v, grid), naive(q, k, v)
    assert ours.shape == (batch, grid.tokens, heads, head_dim) and ours.dtype == torch.float64
    assert relative_error(ours, reference) <= tol
    upstream = torch.randn_like(reference)
    grads = torch.autograd.grad(ours, inputs, upstream, materialize_grads=True)
    reference_grads = torch.autograd.grad(reference, inputs, upstream, materialize_grads=True)
    for name, g, ref in zip(["q", "k", "v", *params], grads, reference_grads):
        # An exactly zero gradient (q with a single key) is compared in absolute terms.
        scale = ref.abs().max().item() or 1.0
        assert (g - ref).abs().max().item() <= tol * scale, f"gradient of {name} differs"


def counted_matmul_flops(processor, grid, heads, head_dim, fake=False):
    """FLOPs of the matmuls (mm/bmm/…) that `attend_reference` runs for one bf16 video; `fake` runs no math."""
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else torch.no_grad():
        q, k, v = (torch.randn(1, grid.tokens, heads, head_dim, dtype=torch.bfloat16) for _ in range(3))
        with FlopCounterMode(display=False) as counter:
            processor.attend_reference(q, k, v, grid)
    return counter.get_total_flops()


def assert_flops_equal_counted_matmuls(cls, config, heads=3, head_dim=32):
    """`cls.flops` equals the matmul FLOPs counted on a small odd grid (run) and on Wan's grid (fake tensors)."""
    processor = cls(config, heads=heads, head_dim=head_dim, dim=heads * head_dim)
    for grid, fake in ((VideoGrid(3, 5, 7), False), (WAN_GRID, True)):
        assert cls.flops(config, grid, heads, head_dim) == counted_matmul_flops(processor, grid, heads, head_dim, fake)


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                        if isinstance(t, torch.Tensor)]
        return out


def assert_no_token_by_token_tensor(processor, grid, heads, head_dim):
    """Forward and backward never make a tensor with two axes of length S."""
    q, k, v = qkv(1, grid, heads, head_dim, dtype=torch.float32)
    with ShapeRecorder() as recorder:
        processor.attend_reference(q, k, v, grid).sum().backward()
    assert recorder.shapes
    assert not [s for s in recorder.shapes if s.count(grid.tokens) > 1]


# ---- linear -----------------------------------------------------------------------------------
def naive_linear(processor):
    def attend(q, k, v):
        weights = linear_kernel_matrix(processor, q, k)  # [B, H, S, S]
        return torch.einsum("bhij,bjhd->bihd", weights, v) / weights.sum(-1).transpose(1, 2).unsqueeze(-1)

    return attend


@pytest.mark.parametrize(
    "grid, batch, heads, head_dim, config",
    [
        (VideoGrid(3, 5, 7), 2, 3, 8, LinearConfig()),
        (VideoGrid(2, 3, 4), 2, 2, 6, LinearConfig(feature_dim=5, hidden_dim=4)),
        (VideoGrid(1, 1, 1), 1, 2, 4, LinearConfig(feature_dim=7)),
        (VideoGrid(2, 3, 4), 2, 2, 6, LinearConfig(kind="polynomial", degree=3, hidden_dim=2)),
    ],
    ids=["3x5x7", "2x3x4-hidden", "single-token", "2x3x4-polynomial"],
)
def test_linear_matches_explicit_formula_fp64(grid, batch, heads, head_dim, config):
    processor = random_processor(LinearAttention, config, heads, head_dim)
    assert_matches_naive(processor, naive_linear(processor), grid, batch, heads, head_dim)


@pytest.mark.parametrize("feature_dim, hidden_dim", [(None, 0), (None, 3), (4, 0), (10, 2)])
def test_feature_maps_start_at_hedgehog_identity(feature_dim, hidden_dim):
    head_dim = 6
    processor = LinearAttention(LinearConfig(feature_dim, hidden_dim), heads=2, head_dim=head_dim, dim=12)
    x = torch.randn(2, 5, 2, head_dim)
    psi = F.pad(x, (0, max((feature_dim or head_dim) - head_dim, 0)))[..., : feature_dim or head_dim]
    expected = torch.cat([psi, -psi], dim=-1).softmax(dim=-1)
    for feature_map in (processor.feature_map_q, processor.feature_map_k):
        assert torch.allclose(feature_map(x), expected, atol=1e-7)


@pytest.mark.parametrize("feature_dim, degree", [(None, 2), (4, 3), (10, 4)])
def test_polynomial_maps_start_at_their_even_powers(feature_dim, degree):
    """Attention Surgery's φ = [ψ_1, ψ_2², …]: at init the even powers' slices hold x (zero-padded or truncated to
    F), the odd ones zero, so every feature starts ≥ 0."""
    head_dim = 6
    config = LinearConfig(feature_dim, kind="polynomial", degree=degree)
    processor = LinearAttention(config, heads=2, head_dim=head_dim, dim=12)
    x = torch.randn(2, 5, 2, head_dim)
    width = feature_dim or head_dim
    psi = F.pad(x, (0, max(width - head_dim, 0)))[..., :width]
    expected = torch.cat([psi**p if p % 2 == 0 else torch.zeros_like(psi) for p in range(1, degree + 1)], dim=-1)
    assert config.feature_count(head_dim) == degree * width == config.psi_width(head_dim)
    for feature_map in (processor.feature_map_q, processor.feature_map_k):
        assert not feature_map.fused
        assert torch.allclose(feature_map(x), expected, atol=1e-7)


def test_feature_maps_are_separate_per_layer_and_deterministic():
    def build():
        torch.manual_seed(3)
        return [LinearAttention(LinearConfig(hidden_dim=4), heads=2, head_dim=8, dim=16) for _ in range(2)]

    first, second = build(), build()
    state = first[0].state_dict()
    assert sorted(state) == sorted(
        f"feature_map_{m}.{p}" for m in "qk" for p in ("weight", "bias", "hidden_weight", "hidden_bias", "hidden_out")
    )
    assert all(torch.equal(state[n], second[0].state_dict()[n]) for n in state)
    # Layers draw their random hidden layers in turn, so no two layers share values.
    assert not torch.equal(first[0].feature_map_q.hidden_weight, first[1].feature_map_q.hidden_weight)
    assert not torch.equal(first[0].feature_map_q.hidden_weight, first[0].feature_map_k.hidden_weight)
    assert first[0].feature_map_q.weight is not first[0].feature_map_k.weight


def test_bf16_inputs_are_summed_in_fp32():
    grid, heads, head_dim = VideoGrid(2, 3, 5), 2, 8
    processor = random_processor(LinearAttention, LinearConfig(hidden_dim=3), heads, head_dim).float()
    q, k, v = (t.detach().to(torch.bfloat16) for t in qkv(2, grid, heads, head_dim))
    out = processor.attend_reference(q, k, v, grid)
    assert out.dtype == torch.bfloat16
    in_fp32 = processor.attend_reference(q.float(), k.float(), v.float(), grid)
    assert torch.equal(out, in_fp32.to(torch.bfloat16))
    exact = naive_linear(processor.double())(q.double(), k.double(), v.double())
    assert relative_error(out.double(), exact) <= 1e-2


@pytest.mark.parametrize(
    "config", [LinearConfig(), LinearConfig(feature_dim=24, hidden_dim=16),
               LinearConfig(feature_dim=16, hidden_dim=8, kind="polynomial", degree=3)],
    ids=["default", "hidden", "polynomial"]
)
def test_linear_flops_equal_counted_matmuls(config):
    assert_flops_equal_counted_matmuls(LinearAttention, config)


def test_linear_flops_by_hand_for_wan_1_3b():
    # 12 heads × 128, F = 128. Per token and head: φ_q and φ_k 2·128·128 each; the summary and its
    # application 2·256·129 each.
    per_token_head = 2 * (2 * 128 * 128) + 2 * (2 * 256 * 129)
    assert LinearAttention.flops(LinearConfig(), WAN_GRID, 12, 128) == 12 * 32760 * per_token_head
    assert LinearAttention.density(LinearConfig(), WAN_GRID) == 0.0


def test_linear_never_forms_a_token_by_token_matrix():
    processor = LinearAttention(LinearConfig(), heads=2, head_dim=8, dim=16)
    assert_no_token_by_token_tensor(processor, VideoGrid(2, 4, 5), 2, 8)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"feature_dim": 0}, "feature_dim must be an int ≥ 1"),
        ({"feature_dim": 2.5}, "feature_dim must be an int ≥ 1"),
        ({"hidden_dim": -1}, "hidden_dim must be an int ≥ 0"),
        ({"hidden_dim": True}, "hidden_dim must be an int ≥ 0"),
        ({"kind": "elu"}, "kind must be one of 'hedgehog', 'polynomial'"),
        ({"kind": "polynomial", "degree": 1}, "degree must be an int ≥ 2"),
    ],
)
def test_bad_linear_settings_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        LinearConfig(**params)


def test_linear_config_round_trips_through_dict():
    config = LinearConfig(feature_dim=16, hidden_dim=8)
    assert LinearConfig.from_dict(config.to_dict()) == config
    polynomial = LinearConfig(kind="polynomial", degree=3)
    assert LinearConfig.from_dict(polynomial.to_dict()) == polynomial
    assert VARIANTS["linear"] is LinearAttention
    with pytest.raises(SurgeryError, match="feature_dim must be an int"):
        LinearConfig.from_dict({"feature_dim": -3})


def test_linear_runs_and_trains_inside_the_tiny_model(tiny_model):
    surgery.apply(tiny_model, LinearConfig())
    processors = surgery.variant_processors(tiny_model)
    assert len(processors) == 4 and all(isinstance(p, LinearAttention) for p in processors.values())
    assert "blocks.2.attn1.processor.feature_map_k.weight" in tiny_model.state_dict()
    out = tiny_model(**model_inputs(tiny_model, VideoGrid(6, 10, 10), batch=1)).sample
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for processor in processors.values():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in processor.parameters())
