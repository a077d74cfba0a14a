"""Distillation-aware planning on the tiny model: learned candidates measured after stage 1, their weights
kept beside the plan and reused by distill."""

import json

import pytest
import torch
from typer.testing import CliRunner

import surgery
from surgery.cli.app import app
from surgery.errors import PlanError
from surgery.plan import Plan, stage1_weights_path
from surgery.planner import make_plan
from surgery.recipe import Stage1, load_recipe
from surgery.sensitivity import Candidate
from surgery.train import distill
from surgery.train.distilled_errors import DistilledErrors

# Few steps at a large lr: the learned candidates move far enough from their init for the tests to see it.
MEASURE = DistilledErrors(Stage1(steps=8, lr=5e-2), samples=4)


@pytest.fixture(scope="module")
def tiny():
    return surgery.load_model("tiny")


@pytest.fixture(scope="module")
def planned(tiny):
    """A plan at budget 0.5 whose errors were measured after stage 1, on linear and hybrid only."""
    return make_plan("tiny", 0.5, model=tiny, samples=2, variants=["hybrid", "linear"], measure=MEASURE)


def test_distilled_plan_is_deterministic_fits_the_budget_and_keeps_the_chosen_weights(tiny, planned):
    again = make_plan("tiny", 0.5, model=tiny, samples=2, variants=["hybrid", "linear"], measure=MEASURE)
    assert planned.to_dict() == again.to_dict()  # including the weights' SHA-256
    assert planned.meta["flops_ratio"] <= 0.5
    assert planned.meta["calibration"]["errors"].startswith("learned candidates after stage 1 (8 steps")
    learned = {fqn for fqn, c in planned.layers.items() if c.variant != "full"}
    assert learned and {name.split(".processor.")[0] for name in planned.stage1} == learned
    for name, tensor in planned.stage1.items():
        assert torch.equal(tensor, again.stage1[name]), name
    # Every learned candidate trained, and is measured after it: not at the error of its init.
    init = make_plan("tiny", 0.5, model=tiny, samples=2, variants=["hybrid", "linear"])
    trained = [c for c in planned.meta["candidates"] if "stage1_loss" in c]
    assert len(trained) == 4 * 4  # 3 hybrid rates and linear, on each of the 4 layers
    untrained = {(c["layer"], c["label"]): c["error"] for c in init.meta["candidates"]}
    assert all(c["error"] != untrained[c["layer"], c["label"]] for c in trained)
    assert sum(c["error"] for c in trained) < sum(untrained[c["layer"], c["label"]] for c in trained)
    assert init.stage1 is None


def test_errors_are_measured_on_inputs_the_training_never_saw(tiny, monkeypatch):
    from surgery.train import distilled_errors

    seen = {}
    real = distilled_errors.build_dataset

    def remember(section, config, grid, text_tokens, seed, *image_tokens):
        seen["training"] = (section.source, seed)
        return real(section, config, grid, text_tokens, seed, *image_tokens)

    monkeypatch.setattr(distilled_errors, "build_dataset", remember)
    make_plan("tiny", 0.5, model=tiny, samples=2, seed=3, variants=["linear"],
              measure=DistilledErrors(Stage1(steps=1), samples=2))
    assert seen["training"] == ("noise", 4)  # calibration draws its inputs from seed 3


def test_stage1_weights_are_written_atomically(planned, tmp_path, monkeypatch):
    import surgery.io

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(surgery.io.os, "replace", crash)
    with pytest.raises(OSError):
        planned.save(tmp_path / "plan.json")
    assert list(tmp_path.iterdir()) == []  # no temporary file, no partial weights, no plan
    monkeypatch.undo()
    planned.save(tmp_path / "plan.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "plan.stage1.safetensors"]
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.stage1.keys() == planned.stage1.keys()
    assert all(torch.equal(loaded.stage1[k], v) for k, v in planned.stage1.items())


def _first_stage1_losses(run) -> dict[str, float]:
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["stage"] == "stage1" and first["step"] == 1
    return first["layers"]


def test_distill_starts_stage1_from_the_planners_weights(tiny, tmp_path):
    # Linear candidates fall furthest in stage 1 (their init is the crudest), well beyond batch-to-batch noise.
    planned = make_plan("tiny", 0.5, model=tiny, samples=1, variants=["linear"],
                        measure=DistilledErrors(Stage1(steps=12, lr=5e-2), samples=4))
    recipe = load_recipe("hybrid", ["stage1.steps=1", "stage2.steps=0", "data.samples=2"])
    distill("tiny", recipe, tmp_path / "reused", plan=planned)
    without = Plan.from_dict(planned.to_dict())  # the same layers, no weights: stage 1 from scratch
    assert without.stage1 is None
    distill("tiny", recipe, tmp_path / "fresh", plan=without)
    reused, fresh = _first_stage1_losses(tmp_path / "reused"), _first_stage1_losses(tmp_path / "fresh")
    ends = {}
    for c in planned.meta["candidates"]:
        choice = planned.layers[f"blocks.{c['layer']}.attn1"]
        if "stage1_loss" in c and c["label"] == Candidate(choice.variant, choice.config).label():
            ends[f"blocks.{c['layer']}.attn1"] = c["stage1_loss"]
    assert set(ends) == set(reused) and ends
    for fqn, (planner_first, planner_last) in ends.items():
        # The same batch in both runs: the reused layer starts lower, where the planner left it.
        assert reused[fqn] < fresh[fqn], fqn
        assert abs(reused[fqn] - planner_last) < abs(reused[fqn] - planner_first), fqn


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_plan_whose_weights_are_missing_or_corrupt_is_one_line_and_exit_2(planned, tmp_path, damage):
    path = planned.save(tmp_path / "plan.json")
    weights = stage1_weights_path(path)
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:-8] + b"broken!!")
    with pytest.raises(PlanError, match="stage-1 weights"):
        Plan.load(path)
    result = CliRunner().invoke(app, ["distill", "--plan", str(path), "--out", str(tmp_path / "run"),
                                      "--set", "stage1.steps=1", "--set", "stage2.steps=0"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "stage-1 weights" in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_weights_for_another_layout_are_refused(planned, tmp_path):
    plan = Plan.from_dict(planned.to_dict())
    plan.stage1 = {f"{name}.extra" if i == 0 else name: t for i, (name, t) in enumerate(planned.stage1.items())}
    with pytest.raises(PlanError, match="is not a parameter of its planned layer"):
        surgery.apply(surgery.load_model("tiny"), plan)


def test_cli_plans_with_distilled_errors_and_writes_the_weights_beside_the_plan(tmp_path):
    recipe = tmp_path / "quick.toml"
    recipe.write_text('name = "quick"\n[stage1]\nsteps = 2\n[data]\nsamples = 2\n')
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(app, ["plan", "--budget", "0.5", "--samples", "1", "--variants", "linear",
                                      "--recipe", str(recipe), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(out.read_text())
    assert json.loads(out.read_text())["stage1_weights"]["tensors"] > 0
    assert Plan.load(out).stage1 and stage1_weights_path(out).exists()


def test_the_planner_keeps_whichever_tables_plan_samples_closer_to_the_model(tiny):
    from surgery.trajectories import final_latents, processors_error, sampling_starts
    from surgery.planner import CHECK_STEPS, calibrate, solve_plan
    from surgery.swap import self_attention_modules

    ctx = calibrate("tiny", model=tiny, samples=2, variants=["hybrid", "linear"], measure=MEASURE)
    table = ctx["table"]
    # The errors as built are the init planner's, candidate for candidate.
    as_built = calibrate("tiny", model=tiny, samples=2, variants=["hybrid", "linear"])["table"].errors
    assert [e for row in table.built_errors for e in row] == pytest.approx([e for row in as_built for e in row], rel=1e-5)
    # Two tables that disagree: after stage 1, linear everywhere; as built, full and hybrid R = 2.
    variants, labels = [c.variant for c in table.candidates], [c.label() for c in table.candidates]
    ctx["errors"] = [[0.0 if variants[j] == "linear" else 1.0 for j in row] for row in ctx["allowed"]]
    table.built_errors = [[0.0 if variants[j] == "full" else 0.1 if "rate=2" in labels[j] else 1.0
                           for j in range(len(labels))] for _ in ctx["allowed"]]
    stock = {fqn: attn.processor for fqn, attn in self_attention_modules(tiny).items()}
    plan = solve_plan(ctx, 0.5)
    check = plan.meta["whole_student_check"]
    errors = check["final_latent_error"]
    # Both tables' plans and each variant alone at its most expensive fitting setting, each plan sampled once
    # (linear on every layer is the stage-1 table's plan here).
    assert {"errors after stage 1", "errors as built"} <= set(errors) and all(e > 0 for e in errors.values())
    assert any(name.startswith("hybrid(") and name.endswith(" on every layer") for name in errors)
    assert not any(name.startswith("linear") for name in errors)
    assert check["kept"] == min(errors, key=errors.get)
    all_linear = all(c.variant == "linear" for c in plan.layers.values())
    assert all_linear == (check["kept"] == "errors after stage 1")
    assert plan.meta["flops_ratio"] <= 0.5
    # The check sampled each plan's trained processors and put the model's own back.
    assert {fqn: attn.processor for fqn, attn in self_attention_modules(tiny).items()} == stock
    starts, _ = sampling_starts(tiny, "tiny", ctx["grid"], 2, 0)
    linear = {fqn: table.modules[i][variants.index("linear")] for i, fqn in enumerate(stock)}
    again = processors_error(tiny, starts, CHECK_STEPS, final_latents(tiny, starts, CHECK_STEPS), linear)
    assert errors["errors after stage 1"] == pytest.approx(again, rel=1e-5)
