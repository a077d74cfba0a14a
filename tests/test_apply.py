import copy

import pytest
import torch

import surgery
from surgery.errors import PlanError
from surgery.grid import VideoGrid
from surgery.plan import Plan
from surgery.variants import AttentionVariant
from surgery.variants.full import FullConfig

from .conftest import model_inputs

GRID = VideoGrid(3, 4, 6)


def test_full_swap_equals_stock_diffusers(tiny_model):
    reference = copy.deepcopy(tiny_model)
    inputs = model_inputs(tiny_model, GRID)
    surgery.apply(tiny_model, Plan.uniform("tiny", dict(tiny_model.config), "full"))
    with torch.no_grad():
        ours = tiny_model(**inputs).sample
        stock = reference(**inputs).sample
    assert all(isinstance(b.attn1.processor, AttentionVariant) for b in tiny_model.blocks)
    assert (ours - stock).abs().max().item() <= 1e-6


def test_full_swap_equals_stock_with_fused_projections(tiny_model):
    reference = copy.deepcopy(tiny_model)
    inputs = model_inputs(tiny_model, GRID, batch=1)
    tiny_model.fuse_qkv_projections()
    surgery.apply(tiny_model, FullConfig())
    with torch.no_grad():
        assert (tiny_model(**inputs).sample - reference(**inputs).sample).abs().max().item() <= 1e-5


def test_cross_attention_is_never_touched(tiny_model):
    before = [type(b.attn2.processor) for b in tiny_model.blocks]
    surgery.apply(tiny_model, FullConfig())
    assert [type(b.attn2.processor) for b in tiny_model.blocks] == before
    assert not any(isinstance(b.attn2.processor, AttentionVariant) for b in tiny_model.blocks)


def test_filter_fn_selects_layers(tiny_model):
    surgery.apply(tiny_model, FullConfig(), filter_fn=lambda module, fqn: fqn in ("blocks.1.attn1", "blocks.3.attn1"))
    assert sorted(surgery.variant_processors(tiny_model)) == ["blocks.1.attn1", "blocks.3.attn1"]


def test_plan_round_trips_through_json_and_applies_from_a_file(tiny_model, tmp_path):
    plan = Plan.uniform("tiny", dict(tiny_model.config), "full")
    path = plan.save(tmp_path / "plan.json")
    assert Plan.load(path).to_dict() == plan.to_dict()
    surgery.apply(tiny_model, str(path))
    assert len(surgery.variant_processors(tiny_model)) == 4


def test_plan_for_another_model_is_refused_and_nothing_changes(tiny_model):
    other = dict(tiny_model.config, ffn_dim=256)
    with pytest.raises(PlanError, match="config"):
        surgery.apply(tiny_model, Plan.uniform("other", other, "full"))
    fewer = dict(tiny_model.config, num_layers=2)
    with pytest.raises(PlanError, match="2 layers"):
        surgery.apply(tiny_model, Plan.uniform("other", fewer, "full"))
    assert surgery.variant_processors(tiny_model) == {}


def test_bad_plan_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="cannot read"):
        Plan.load(bad)
    bad.write_text('{"version": 1, "model": {"id": "x", "fingerprint": "y", "num_layers": 1}, '
                   '"layers": {"blocks.0.attn1": {"variant": "nope"}}}')
    with pytest.raises(PlanError, match="unknown attention variant 'nope'"):
        Plan.load(bad)
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")


def test_variant_without_forward_context_fails_clearly(tiny_model):
    processor = full_processor_for(tiny_model)
    tiny_model.blocks[0].attn1.set_processor(processor)
    with pytest.raises(surgery.SurgeryError, match="surgery.apply"):
        tiny_model(**model_inputs(tiny_model, GRID, batch=1))


def full_processor_for(model):
    from surgery.variants.full import FullAttention

    return FullAttention.from_dense(model.blocks[0].attn1, FullConfig())
