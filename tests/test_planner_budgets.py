"""Several budgets from one calibration, and the fastest plan."""

import pytest

from surgery.planner import FASTEST, make_plan, make_plans


def test_plans_from_one_calibration_equal_separate_planning(tiny_model):
    shared = make_plans("tiny", [0.8, 0.4], model=tiny_model, samples=1)
    alone = [make_plan("tiny", budget, model=tiny_model, samples=1) for budget in (0.8, 0.4)]
    assert [p.to_dict() for p in shared] == [p.to_dict() for p in alone]
    assert shared[1].meta["flops_ratio"] <= 0.4 < shared[0].meta["flops_ratio"] <= 0.8


def test_the_fastest_plan_takes_the_cheapest_candidate_of_every_layer(tiny_model):
    fastest, = make_plans("tiny", [FASTEST], model=tiny_model, samples=1)
    per_layer = {}
    for entry in fastest.meta["candidates"]:
        per_layer.setdefault(entry["layer"], []).append(entry["flops"])
    assert fastest.meta["flops"] == pytest.approx(sum(min(f) for f in per_layer.values()))
    assert fastest.budget == pytest.approx(fastest.meta["flops_ratio"])
    assert fastest.meta["solver"]["optimality_gap"] == 0
    with pytest.raises(Exception, match="below what the cheapest candidates reach"):
        make_plan("tiny", fastest.budget * 0.99, model=tiny_model, samples=1)
