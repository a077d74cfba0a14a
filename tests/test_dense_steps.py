"""Plans that keep the model's dense attention for the first, highest-noise sampling steps."""

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

import surgery
from surgery.cli.app import app
from surgery.errors import PlanError, SurgeryError
from surgery.exporting import export_planned
from surgery.grid import VideoGrid
from surgery.model import timestep_band
from surgery.plan import Plan
from surgery.planner import make_plan
from surgery.retrofitted import load_exported
from surgery.sampling import dense_boundary, schedule_timesteps

from .conftest import model_inputs

GRID = VideoGrid(3, 4, 6)


@pytest.mark.parametrize("dense,steps", [(1, 8), (2, 8), (3, 8), (13, 50), (49, 50)])
def test_the_boundary_leaves_exactly_the_first_steps_dense(dense, steps):
    boundary = dense_boundary(dense, steps)
    at_or_above = [t >= boundary * 1000 for t in schedule_timesteps(steps)]
    assert at_or_above == [True] * dense + [False] * (steps - dense)


@pytest.mark.parametrize("dense,steps", [(0, 8), (8, 8), (-1, 8)])
def test_dense_steps_out_of_range(dense, steps):
    with pytest.raises(SurgeryError, match="dense steps must be between 1 and 7"):
        dense_boundary(dense, steps)


def _outputs(model, inputs, timestep: float):
    with torch.no_grad():
        return model(**{**inputs, "timestep": torch.full_like(inputs["timestep"], timestep)}).sample


def test_a_plan_runs_dense_at_and_above_its_boundary_only(tiny_model):
    stock = copy.deepcopy(tiny_model)
    plan = Plan.uniform("tiny", dict(tiny_model.config), "linear")
    plan.dense_boundary = 0.9
    surgery.apply(tiny_model, Plan.from_dict(plan.to_dict()))  # through JSON, as an export carries it
    inputs = model_inputs(tiny_model, GRID, batch=1)
    for timestep in (900.0, 999.0):
        assert (_outputs(tiny_model, inputs, timestep) - _outputs(stock, inputs, timestep)).abs().max() <= 1e-5
    below = _outputs(tiny_model, inputs, 899.0) - _outputs(stock, inputs, 899.0)
    assert below.abs().max() > 1e-3  # the linear attention's own output
    surgery.apply(tiny_model, Plan.uniform("tiny", dict(tiny_model.config), "linear"))  # a plan without: none dense
    assert (_outputs(tiny_model, inputs, 999.0) - _outputs(stock, inputs, 999.0)).abs().max() > 1e-3


@pytest.mark.parametrize("boundary", [0, 1.5, "high"])
def test_a_bad_boundary_is_a_plan_error(tiny_model, boundary):
    data = Plan.uniform("tiny", dict(tiny_model.config), "linear").to_dict() | {"dense_boundary": boundary}
    with pytest.raises(PlanError, match="dense_boundary must be a timestep ratio"):
        Plan.from_dict(data)


def test_planner_counts_the_dense_steps_in_the_budget(_tiny_model):
    plan = make_plan("tiny", 0.5, model=_tiny_model, samples=2, dense_steps=2, sampling_steps=8)
    assert plan.dense_boundary == dense_boundary(2, 8)
    planned = plan.meta["dense_steps"]["planned_steps_flops_ratio"]
    assert planned <= (0.5 - 0.25) / 0.75 + 1e-9
    assert plan.meta["flops_ratio"] == pytest.approx(0.25 + 0.75 * planned) and plan.meta["flops_ratio"] <= 0.5
    assert plan.meta["calibration"]["timesteps"] == f"spread evenly over (0, {1000 * plan.dense_boundary:g})"
    with pytest.raises(SurgeryError, match="leaves nothing for the planned steps"):
        make_plan("tiny", 0.25, model=_tiny_model, samples=1, dense_steps=2, sampling_steps=8)
    with pytest.raises(SurgeryError, match="two-expert model"):
        make_plan("tiny-wan2.2@transformer_2", 0.5, samples=1, dense_steps=2, sampling_steps=8)
    # A one-transformer model named with its only transformer is that model, dense steps included.
    named = make_plan("tiny@transformer", 0.5, model=_tiny_model, samples=2, dense_steps=2, sampling_steps=8)
    assert named.layers == plan.layers and named.dense_boundary == plan.dense_boundary


def test_training_serves_the_timesteps_below_the_boundary():
    assert timestep_band("tiny", 0.9) == (0.0, 0.9)
    assert timestep_band("tiny") == (0.0, 1.0)
    ratio = surgery.model.model_kind("tiny-wan2.2").boundary_ratio
    assert timestep_band("tiny-wan2.2@transformer", 0.99) == (ratio, 0.99)


def test_an_export_keeps_its_dense_steps(_tiny_model, tmp_path):
    plan = Plan.uniform("tiny", dict(_tiny_model.config), "vsa", {"sparsity": 0.75})
    plan.grid, plan.dense_boundary = GRID, dense_boundary(2, 8)
    exported = load_exported(export_planned("tiny", plan, tmp_path / "exported"))
    inputs = model_inputs(exported, GRID, batch=1)
    high, low = schedule_timesteps(8)[1], schedule_timesteps(8)[2]
    assert (_outputs(exported, inputs, high) - _outputs(_tiny_model, inputs, high)).abs().max() <= 1e-5
    in_memory = surgery.apply(copy.deepcopy(_tiny_model), plan)
    assert (_outputs(exported, inputs, low) - _outputs(in_memory, inputs, low)).abs().max() <= 1e-5
    assert (_outputs(exported, inputs, low) - _outputs(_tiny_model, inputs, low)).abs().max() > 1e-4


def test_cli_plans_dense_steps_and_refuses_too_many(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["plan", "--no-distill-errors", "--dense-steps", "8", "--sampling-steps", "8",
                              "--out", str(tmp_path / "bad.json")])
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.output
    assert not (tmp_path / "bad.json").exists()
    good = runner.invoke(app, ["plan", "--no-distill-errors", "--dense-steps", "2", "--sampling-steps", "8",
                               "--budget", "0.6", "--samples", "1", "--out", str(tmp_path / "p.json")])
    assert good.exit_code == 0, good.output
    assert "the first 2 of 8 steps dense" in " ".join(good.stdout.split())
    assert json.loads((tmp_path / "p.json").read_text())["dense_boundary"] == dense_boundary(2, 8)
