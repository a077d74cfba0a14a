import importlib
import json

import pytest
import torch
from safetensors.torch import load_file

import surgery
from surgery.errors import SurgeryError
from surgery.plan import Plan
from surgery.recipe import load_recipe
from surgery.train import distill
from surgery.train.loop import StopRequested, run_stage

GRID = surgery.VideoGrid(6, 10, 10)


def hybrid_plan():
    """Two layers hybrid (trainable feature maps), two full: a small, fixed plan."""
    config = surgery.load_config("tiny")
    plan = Plan.uniform("tiny", config, "hybrid", {"rate": 4})
    for fqn in ("blocks.0.attn1", "blocks.3.attn1"):
        plan.layers[fqn] = Plan.uniform("tiny", config, "full").layers[fqn]
    plan.grid = GRID
    return plan


RECIPE = ["stage1.steps=6", "stage2.steps=4", "train.checkpoint_every=3", "data.samples=4"]


def test_resume_after_a_stop_gives_the_same_weights(tmp_path):
    recipe = load_recipe("hybrid", RECIPE)
    distill("tiny", recipe, tmp_path / "straight", plan=hybrid_plan())
    for stop_after in (4, 3):  # once inside stage 1, once inside stage 2
        with pytest.raises(StopRequested):
            distill("tiny", recipe, tmp_path / "stopped", plan=hybrid_plan(), stop_after=stop_after,
                    resume=(tmp_path / "stopped").exists())
    # Resuming uses the run's saved recipe, whatever recipe the caller passes now.
    distill("tiny", load_recipe("vsa"), tmp_path / "stopped", plan=hybrid_plan(), resume=True)
    straight = load_file(tmp_path / "straight" / "student.safetensors")
    resumed = load_file(tmp_path / "stopped" / "student.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 1, 2, 3, 4]


def test_stage1_trains_only_new_attention_and_leaves_the_teacher_bit_identical(tmp_path):
    teacher_before = {k: v.clone() for k, v in surgery.load_model("tiny").state_dict().items()}
    recipe = load_recipe("hybrid", ["stage1.steps=8", "stage2.steps=0", "data.samples=4"])
    summary = distill("tiny", recipe, tmp_path / "run", plan=hybrid_plan())
    student = load_file(tmp_path / "run" / "student.safetensors")
    for key, value in teacher_before.items():
        assert torch.equal(student[key], value), key  # stage 2 off: only processor tensors may differ
    assert set(student) - set(teacher_before) and all(".processor." in k for k in set(student) - set(teacher_before))
    assert set(summary.stage1_losses) == {"blocks.1.attn1", "blocks.2.attn1"}
    for first, last in summary.stage1_losses.values():
        assert last < first
    # Uniform attention's loss is logged beside it: the mean of v against the teacher's output.
    assert set(summary.stage1_uniform_attention) == set(summary.stage1_losses)
    for fqn, uniform in summary.stage1_uniform_attention.items():
        assert uniform > summary.stage1_losses[fqn][1] > 0
    assert all(torch.equal(v, teacher_before[k]) for k, v in surgery.load_model("tiny").state_dict().items())


def test_teacher_object_is_untouched_by_distillation(tmp_path, monkeypatch):
    distill_module = importlib.import_module("surgery.train.distill")  # the package re-exports the function
    seen = {}
    real_load = distill_module.load_model

    def remember(spec, **options):
        seen["teacher"] = real_load(spec, **options)
        seen["before"] = {k: v.clone() for k, v in seen["teacher"].state_dict().items()}
        return seen["teacher"]

    monkeypatch.setattr(distill_module, "load_model", remember)
    distill("tiny", load_recipe("hybrid", RECIPE), tmp_path / "run", plan=hybrid_plan())
    after = seen["teacher"].state_dict()
    assert all(torch.equal(after[k], v) for k, v in seen["before"].items())


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from surgery.data import StepSampler

    real_batch = StepSampler.batch

    def poisoned_from_step_3(self, step, device, dtype):
        batch = real_batch(self, step, device, dtype)
        if step >= 2:
            batch.inputs.fill_(float("nan"))
        return batch

    monkeypatch.setattr(StepSampler, "batch", poisoned_from_step_3)
    recipe = load_recipe("hybrid", ["stage1.steps=6", "stage2.steps=0", "train.checkpoint_every=1", "data.samples=2"])
    with pytest.raises(SurgeryError, match=r"loss became nan at step 2; last good checkpoint: .*step-000002"):
        distill("tiny", recipe, tmp_path / "run", plan=hybrid_plan())
    assert (tmp_path / "run" / "checkpoints" / "stage1" / "step-000002" / "params.safetensors").exists()


def test_refuses_to_overwrite_a_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "something").write_text("x")
    with pytest.raises(SurgeryError, match="not empty"):
        distill("tiny", load_recipe("hybrid", RECIPE), tmp_path / "run", plan=hybrid_plan())


def test_lr_scales_give_each_parameter_its_own_step(tmp_path):
    # AdamW's first step moves every parameter by about lr (its update is m/√v = ±1 then), so the two
    # moves compare the learning rates each parameter got.
    params = {"a": torch.nn.Parameter(torch.zeros(4)), "b": torch.nn.Parameter(torch.zeros(4))}

    def step(_):
        (params["a"].sum() + params["b"].sum()).backward()
        return {"loss": 1.0}

    schedule = load_recipe("hybrid", ["stage1.steps=1", "stage1.lr=0.1"]).stage1
    run_stage("s", params, step, schedule, tmp_path / "ck", tmp_path / "m.jsonl", checkpoint_every=1,
              lr_scales={"a": 0.01})
    assert torch.allclose(params["b"], torch.full((4,), -0.1)) and torch.allclose(params["a"], torch.full((4,), -0.001))


@pytest.mark.usefixtures("one_thread")
def test_planning_inside_distill_reports_progress(tmp_path):
    seen = []
    recipe = load_recipe("hybrid", ["plan.samples=2", "stage1.steps=1", "stage2.steps=1", "data.samples=1"])
    distill("tiny", recipe, tmp_path / "run", progress=lambda stage, step, total, metrics: seen.append((stage, step, total)))
    # The planner's one stage-1 step of the learned candidates, then its two calibration inputs.
    assert seen[:3] == [("calibrating", 1, 3), ("calibrating", 2, 3), ("calibrating", 3, 3)]
    assert {stage for stage, _, _ in seen} >= {"calibrating", "stage2"}


def _timesteps(shift: float, band=(0.0, 1.0), steps: int = 200) -> torch.Tensor:
    from surgery.data import StepSampler

    rows = {"latents": torch.zeros(1, 2, 1, 2, 2), "text_embeddings": torch.zeros(1, 3, 4)}
    dataset = type("Rows", (), {"__len__": lambda self: 1, "__getitem__": lambda self, i: rows})()
    sampler = StepSampler(dataset, 1, seed=0, stage=2, band=band, timestep_shift=shift)
    return torch.cat([sampler.batch(step, "cpu", torch.float32).timestep for step in range(steps)]) / 1000


def test_timestep_shift_trains_more_at_high_noise_within_the_band():
    """data.timestep_shift: the same draws through the sampler's time shift, so shift 1 is uniform as before,
    shift 3 puts about half the steps above t = 0.75 (a quarter when uniform), and an expert's band still
    bounds every draw."""
    uniform, shifted = _timesteps(1.0), _timesteps(3.0)
    assert 0.15 < (uniform > 0.75).float().mean() < 0.35 and 0.4 < (shifted > 0.75).float().mean() < 0.6
    torch.testing.assert_close(shifted, 3 * uniform / (1 + 2 * uniform))
    high = _timesteps(3.0, band=(0.875, 1.0), steps=50)
    assert high.min() >= 0.875 and high.max() <= 1.0
    with pytest.raises(SurgeryError, match="timestep_shift must be > 0"):
        load_recipe("hybrid", ["data.timestep_shift=0"])


def test_the_planner_trains_candidates_at_the_recipes_noise_levels():
    from surgery.train.distilled_errors import DistilledErrors

    recipe = load_recipe("mixed", ["data.timestep_shift=2.0", "data.samples=8"])
    measure = DistilledErrors.for_recipe(recipe)
    assert (measure.stage1, measure.samples, measure.timestep_shift) == (recipe.stage1, 8, 2.0)
