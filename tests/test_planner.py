import json

import pytest
from typer.testing import CliRunner

import surgery
from surgery.cli.app import app
from surgery.errors import SurgeryError
from surgery.plan import Plan
from surgery.planner import make_plan

from .conftest import model_inputs


@pytest.fixture(scope="module")
def tiny():
    return surgery.load_model("tiny")


def test_plan_meets_the_budget_and_applies(tiny, tmp_path):
    plan = make_plan("tiny", 0.6, model=tiny)
    data = plan.to_dict()
    assert data["flops_ratio"] <= 0.6
    assert sum(c.flops for c in plan.layers.values()) == pytest.approx(data["flops"])
    assert any(c.variant != "full" for c in plan.layers.values())
    path = plan.save(tmp_path / "plan.json")
    student = surgery.apply(surgery.load_model("tiny"), str(path))
    out = student(**model_inputs(student, plan.grid, batch=1)).sample
    assert out.isfinite().all()


def test_budget_one_keeps_every_layer_full(tiny):
    plan = make_plan("tiny", 1.0, model=tiny)
    assert {c.variant for c in plan.layers.values()} == {"full"}
    assert plan.meta["total_error"] == 0.0


def test_smaller_budgets_never_give_smaller_error(tiny):
    errors = [make_plan("tiny", b, model=tiny, samples=2).meta["total_error"] for b in (0.3, 0.45, 0.6, 0.8, 1.0)]
    assert all(a >= b for a, b in zip(errors, errors[1:])), errors


def test_plans_are_deterministic_for_a_seed(tiny):
    a = make_plan("tiny", 0.5, model=tiny, samples=2, seed=3).to_dict()
    b = make_plan("tiny", 0.5, model=tiny, samples=2, seed=3).to_dict()
    assert a == b


def test_variants_and_keep_full_restrict_the_choice(tiny):
    plan = make_plan("tiny", 0.7, model=tiny, variants=["vsa"], keep_full=[0])
    assert plan.layers["blocks.0.attn1"].variant == "full"
    assert {c.variant for c in plan.layers.values()} <= {"full", "vsa"}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(budget=0.0), "--budget must be in (0, 1]"),
        (dict(budget=1.2), "--budget must be in (0, 1]"),
        (dict(budget=0.6, variants=["sparse-magic"]), "unknown attention variant 'sparse-magic'"),
        (dict(budget=0.6, keep_full=[7]), "--keep-full layer 7 does not exist"),
        (dict(budget=0.05, variants=["vsa"]), "below what the cheapest candidates reach"),
    ],
)
def test_bad_planner_input(tiny, kwargs, message):
    with pytest.raises(SurgeryError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        make_plan("tiny", model=tiny, **kwargs)


def test_cli_writes_nothing_on_bad_input_and_json_on_success(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["plan", "--budget", "0.01", "--no-distill-errors", "--out", str(tmp_path / "bad.json")])
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad.json").exists()
    good = runner.invoke(app, ["plan", "--budget", "0.6", "--no-distill-errors", "--out", str(tmp_path / "p.json"),
                               "--json"])
    assert good.exit_code == 0, good.output
    assert json.loads(good.stdout) == json.loads((tmp_path / "p.json").read_text())
    assert Plan.load(tmp_path / "p.json").meta["flops_ratio"] <= 0.6


def test_plan_for_another_model_is_refused(tmp_path, tiny):
    plan = make_plan("tiny", 0.6, model=tiny, samples=1)
    other = surgery.load_model("wan2.1-t2v-1.3b", device="meta")
    with pytest.raises(surgery.SurgeryError, match="30 layers|layers"):
        surgery.apply(other, plan)


def test_calibration_from_a_datasets_folder(tiny, tmp_path):
    import datasets
    import torch

    grid = surgery.VideoGrid(6, 10, 10)
    latents = torch.randn(3, 16, 6, 20, 20)
    text = torch.randn(3, 16, 32)
    datasets.Dataset.from_dict({"latents": latents.numpy(), "text_embeddings": text.numpy()}).save_to_disk(
        str(tmp_path / "data"))
    plan = make_plan("tiny", 0.6, model=tiny, samples=2, data=str(tmp_path / "data"))
    assert plan.meta["calibration"]["inputs"].startswith("dataset") and plan.meta["flops_ratio"] <= 0.6
    assert plan.grid == grid
    with pytest.raises(SurgeryError, match="grid needs"):
        make_plan("tiny", 0.6, model=tiny, samples=1, data=str(tmp_path / "data"), frames=5)
