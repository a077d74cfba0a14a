"""Distillation and sampling on 2 processes (torchrun, gloo on CPU) against one process.

One launch (tests/parallel_worker.py) runs every multi-process case; this module runs the single-process
references and compares. Tolerances: losses agree to 1e-5 relative and weights to 1e-4 absolute — the
processes add the same numbers in another order (gradients averaged over processes instead of over one
batch), and AdamW's first steps, ~lr·sign(g), turn rounding differences of tiny gradients into steps of
up to ~1e-5 here. The context-parallel forward is compared at 1e-5 (the all-to-all moves numbers, the
per-head math is the same).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import surgery
from surgery.plan import Plan
from surgery.recipe import load_recipe
from surgery.train import distill
from surgery.train.loop import StopRequested

from .conftest import small_plan

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["stage1.steps=2", "stage2.steps=2", "train.checkpoint_every=1", "data.samples=4", "data.batch_size=2"]
# A run that plans before it trains (calibration only: quick).
PLANNED = ["plan.distill_errors=false", "plan.samples=1", "stage1.steps=1", "stage2.steps=0"]
STOP_AFTER = 3  # both stage-1 steps and one of stage 2: the newest checkpoint is a sharded one under FSDP

pytestmark = pytest.mark.usefixtures("one_thread")



CP_VIDEO = dict(frames=5, height=64, width=64, steps=2, seed=0)  # 2×4×4 tokens: they split in 2


CP_EVAL = dict(samples=1, steps=2, frames=5, height=64, width=64)


def training_free_plan() -> Plan:
    """vsa (its gate at zero) on layers 0 and 2, the others full: what eval --plan takes."""
    config = surgery.load_config("tiny")
    plan = Plan.uniform("tiny", config, "full")
    for fqn in ("blocks.0.attn1", "blocks.2.attn1"):
        plan.layers[fqn] = Plan.uniform("tiny", config, "vsa", {"sparsity": 0.5}).layers[fqn]
    return plan


def cp_plan() -> Plan:
    """A variant of each kind with parameters (hybrid, vsa's gate, linear) and full."""
    config = surgery.load_config("tiny")
    plan = Plan.uniform("tiny", config, "hybrid", {"rate": 4})
    plan.layers["blocks.1.attn1"] = Plan.uniform("tiny", config, "vsa", {"sparsity": 0.5}).layers["blocks.1.attn1"]
    plan.layers["blocks.2.attn1"] = Plan.uniform("tiny", config, "linear").layers["blocks.2.attn1"]
    plan.layers["blocks.3.attn1"] = Plan.uniform("tiny", config, "full").layers["blocks.3.attn1"]
    return plan


def cp_model_and_inputs():
    """The tiny model with `cp_plan`, every processor's parameters random (seeded), and one input; the same in
    every process."""
    model = surgery.apply(surgery.load_model("tiny"), cp_plan())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".processor." in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    inputs = dict(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 16, 32, generator=g))
    return model, inputs


def launch(folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        # As a module from the repository root: run as a script, tests/ would come first on sys.path and its
        # kernels/ folder would hide the `kernels` package that diffusers imports.
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "tests.parallel_worker", str(folder)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """The single-process reference, then the 2-process launch; a 1-process run stopped before the launch is
    resumed inside it, and the launch's stopped FSDP run is resumed here, on one process."""
    folder = tmp_path_factory.mktemp("parallel")
    small_plan().save(folder / "plan.json")
    cp_plan().save(folder / "cp-plan.json")
    (folder / "job.json").write_text(json.dumps({"recipe": RECIPE, "stop_after": STOP_AFTER, "planned": PLANNED}))
    recipe = load_recipe("hybrid", RECIPE)
    distill("tiny", recipe, folder / "single", plan=small_plan())
    distill("tiny", load_recipe("hybrid", RECIPE + ["stage2.steps=0"]), folder / "single-stage1", plan=small_plan())
    distill("tiny", load_recipe("hybrid", RECIPE + PLANNED), folder / "single-planned")
    with pytest.raises(StopRequested):  # FSDP is its recipe's strategy: ignored here, used by the launch that resumes it
        distill("tiny", load_recipe("hybrid", RECIPE + ["parallel.strategy=fsdp"]), folder / "one-stopped",
                plan=small_plan(), stop_after=STOP_AFTER)
    done = launch(folder)
    assert done.returncode == 0, done.stderr[-3000:]
    distill("tiny", recipe, folder / "fsdp-stopped", resume=True)
    return folder


def losses(run: Path) -> list[tuple[str, int, float]]:
    return [(e["stage"], e["step"], e["loss"]) for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def assert_same_run(run: Path, reference: Path):
    got, want = losses(run), losses(reference)
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert [g[2] for g in got] == pytest.approx([w[2] for w in want], rel=1e-5)
    student, expected = load_file(run / "student.safetensors"), load_file(reference / "student.safetensors")
    assert student.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(student[key], expected[key], rtol=0, atol=1e-4, msg=key)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_as_one_on_the_same_global_batch(runs, strategy):
    assert_same_run(runs / strategy, runs / "single")
    # Only the main process logs: one line per step, with the global batch's sample count.
    samples = [json.loads(line)["samples"] for line in (runs / strategy / "metrics.jsonl").read_text().splitlines()]
    assert samples == [2, 2, 2, 2]


def test_a_stage1_only_run_on_a_sharded_teacher_writes_the_whole_student(runs):
    assert_same_run(runs / "fsdp-stage1", runs / "single-stage1")


def test_processes_that_plan_first_train_the_plan_one_process_makes(runs):
    assert Plan.load(runs / "planned" / "plan.json").to_dict() == Plan.load(runs / "single-planned" / "plan.json").to_dict()
    assert_same_run(runs / "planned", runs / "single-planned")


def test_a_sharded_checkpoint_resumes_on_one_process_and_a_whole_one_on_two(runs):
    assert_same_run(runs / "fsdp-stopped", runs / "single")  # stopped on 2 processes (FSDP), resumed on 1
    assert_same_run(runs / "one-stopped", runs / "single")  # stopped on 1, resumed on 2 (FSDP)


def test_a_context_parallel_forward_equals_the_single_process_one(runs):
    model, inputs = cp_model_and_inputs()
    with torch.no_grad():
        expected = model(**inputs, return_dict=False)[0]
    torch.testing.assert_close(load_file(runs / "cp.safetensors")["out"], expected, rtol=1e-5, atol=1e-5)


def test_context_parallel_generation_and_bench_run_the_pipeline_and_every_row(runs):
    from surgery.evaluate import generate_video

    expected = torch.from_numpy(generate_video("tiny", "a cat", **CP_VIDEO))
    torch.testing.assert_close(load_file(runs / "cp.safetensors")["video"], expected, rtol=1e-5, atol=1e-5)
    report = json.loads((runs / "cp-bench.json").read_text())
    assert report["context_parallel"] == 2
    assert [row["name"] for row in report["rows"]] == ["stock (SDPA default)", "attention core skipped", "student"]


def test_context_parallel_eval_gives_the_single_process_report(runs):
    from surgery.evaluate import evaluate

    expected = evaluate(None, "tiny", plan=training_free_plan(), **CP_EVAL).to_dict()
    got = json.loads((runs / "cp-eval.json").read_text())
    for key in ("velocity_error_mean", "final_latent_rel_error", "psnr_db", "ssim"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


def test_a_resume_on_a_process_count_that_does_not_split_the_batch_is_one_line(tmp_path, monkeypatch):
    from surgery.cli.app import app

    run = tmp_path / "run"
    with pytest.raises(StopRequested):
        distill("tiny", load_recipe("hybrid", RECIPE[:-1] + ["data.batch_size=3"]), run, plan=small_plan(),
                stop_after=1)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun and accelerate launch set: checked before they meet
    result = CliRunner().invoke(app, ["distill", "--out", str(run), "--resume"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: data.batch_size 3 does not split over 2 processes: launch a process count that divides it "
        "(a run keeps the batch size it started with)"]


def test_cp_that_does_not_divide_the_heads_is_one_line(tmp_path):
    from surgery.cli.app import app

    for command in (["generate", "--prompt", "a cat", "--out", str(tmp_path / "v.gif")], ["eval", "--plan", "x.json"],
                    ["bench"]):
        result = CliRunner().invoke(app, [*command, "--cp", "3"])
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines() == ["error: --cp 3 does not divide the model's 2 attention heads"]
    assert not (tmp_path / "v.gif").exists()


def test_an_accelerate_config_that_turns_fsdp_on_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from surgery.cli.app import app

    small_plan().save(tmp_path / "plan.json")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for such a config
    result = CliRunner().invoke(app, ["distill", "--out", str(tmp_path / "run"), "--plan", str(tmp_path / "plan.json")])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "turns FSDP on" in result.output
    assert not (tmp_path / "run").exists()


def test_the_parallel_section_is_typed_like_every_other():
    from surgery.errors import SurgeryError

    assert load_recipe("hybrid").to_dict()["parallel"] == {"strategy": "ddp", "sharding": "full"}
    with pytest.raises(SurgeryError, match="parallel.strategy must be one of 'ddp', 'fsdp', got 'zero3'"):
        load_recipe("hybrid", ["parallel.strategy=zero3"])
    with pytest.raises(SurgeryError, match="parallel: unknown key 'shards'"):
        load_recipe("hybrid", ["parallel.shards=2"])


def _variant_cases():
    from surgery.variants import VARIANTS

    return [pytest.param(name, params, id=f"{name}-{json.dumps(params, sort_keys=True)}")
            for name, cls in VARIANTS.items() for params in cls.plan_candidates]


@pytest.mark.parametrize("name,params", _variant_cases())
def test_every_variant_on_a_group_of_heads_gives_those_heads_of_the_whole(tiny_model, name, params):
    """What context parallelism relies on (no processes needed): each head group with its slice of the parameters."""
    from surgery.variants import VARIANTS

    cls = VARIANTS[name]
    processor = cls.from_dense(tiny_model.blocks[1].attn1, cls.Config.from_dict(params), layer_index=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in processor.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    grid = surgery.VideoGrid(2, 4, 4)
    q, k, v = (torch.randn(1, grid.tokens, processor.heads, processor.head_dim, generator=g) for _ in range(3))
    x = torch.randn(1, grid.tokens, processor.dim, generator=g)
    with torch.no_grad():
        whole = processor.attend(q, k, v, grid, x)
        for index in range(processor.heads):
            heads = slice(index, index + 1)
            part = processor.attend_head_group(q[:, :, heads], k[:, :, heads], v[:, :, heads], grid, x, index,
                                               processor.heads)
            torch.testing.assert_close(part, whole[:, :, heads], rtol=1e-5, atol=1e-6)
    assert processor.heads == 2
