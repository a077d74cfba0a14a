"""Plans used with no distillation: export, generate, eval and bench take `--plan`; learned variants are refused
(except by bench, which times them and says their output means nothing yet)."""

import json

import pytest
import torch
from typer.testing import CliRunner

import surgery
from surgery.cli.app import app
from surgery.grid import VideoGrid
from surgery.latency import TimingCache
from surgery.plan import LayerChoice, Plan
from surgery.planned import load_planned
from surgery.variants.hybrid import HybridConfig
from surgery.variants.vmoba import VMoBAConfig
from surgery.variants.vsa import VSAConfig
from surgery.wan import fingerprint

from .conftest import model_inputs

runner = CliRunner()


def write_plan(path, second_layer):
    config = surgery.load_config("tiny")
    layers = {"blocks.0.attn1": LayerChoice("vsa", VSAConfig(sparsity=0.5)), "blocks.1.attn1": second_layer,
              "blocks.2.attn1": LayerChoice("vmoba", VMoBAConfig(select="topk"))}
    Plan("tiny", fingerprint(config), config["num_layers"], layers).save(path)
    return path


@pytest.fixture
def free_plan(tmp_path):
    return write_plan(tmp_path / "free.json", LayerChoice("vmoba", VMoBAConfig(select="threshold")))


@pytest.fixture
def learned_plan(tmp_path):
    return write_plan(tmp_path / "learned.json", LayerChoice("hybrid", HybridConfig(rate=4)))


def test_export_of_a_training_free_plan_loads_back_as_the_planned_model(free_plan, tmp_path):
    result = runner.invoke(app, ["export", "--model", "tiny", "--plan", str(free_plan), "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    exported = surgery.load_model(str(tmp_path / "e"))
    planned = load_planned("tiny", free_plan)
    inputs = model_inputs(planned, VideoGrid(4, 6, 6), batch=1)
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).sample, planned(**inputs).sample)
    assert sorted(p.name for p in surgery.variant_processors(exported).values()) == ["vmoba", "vmoba", "vsa"]


@pytest.mark.parametrize("command", [
    ["export", "--model", "tiny", "--out", "{tmp}/e"],
    ["generate", "--prompt", "a red square", "--steps", "1", "--out", "{tmp}/v.gif"],
    ["eval", "--samples", "1", "--steps", "1"],
])
def test_a_learned_variant_in_a_training_free_plan_is_one_line_and_nothing_written(command, learned_plan, tmp_path):
    args = [a.format(tmp=tmp_path) for a in command] + ["--plan", str(learned_plan)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "blocks.1.attn1 is hybrid" in lines[0] and "distill" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learned.json"]


def test_generate_and_eval_take_a_training_free_plan(free_plan, tmp_path):
    result = runner.invoke(app, ["generate", "--prompt", "a red square", "--steps", "1", "--frames", "5",
                                 "--height", "32", "--width", "32", "--plan", str(free_plan),
                                 "--out", str(tmp_path / "v.gif")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "v.gif").stat().st_size > 0
    result = runner.invoke(app, ["eval", "--plan", str(free_plan), "--samples", "1", "--steps", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["velocity_error_mean"] > 0 and report["student"].startswith("tiny + plan")


def test_eval_needs_exactly_one_student(free_plan):
    for args in (["eval"], ["eval", "--student", "tiny", "--plan", str(free_plan)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "not both or neither" in result.stderr


def test_bench_times_a_plan_on_this_device_and_notes_untrained_maps(learned_plan):
    result = runner.invoke(app, ["bench", "--plan", str(learned_plan), "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [row["name"] for row in report["rows"]] == ["stock (SDPA default)", "attention core skipped", "student"]
    assert report["converted_layers"] == 3 and 0 < report["attention_flops_ratio"] < 1
    assert any("untrained" in note for note in report["notes"])


def test_latency_planning_without_a_gpu_is_one_line():
    result = runner.invoke(app, ["plan", "--cost", "latency", "--out", "never.json"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "CUDA GPU" in result.stderr


def test_compiled_timing_of_a_flop_plan_is_one_line(tmp_path):
    result = runner.invoke(app, ["plan", "--compiled", "--out", str(tmp_path / "never.json")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "--cost latency" in result.stderr and not any(tmp_path.iterdir())


def test_latency_cache_writes_whole_files_and_measures_again_past_a_corrupt_one(tmp_path, monkeypatch):
    monkeypatch.setenv("VSURGERY_CACHE", str(tmp_path))
    measured = []
    cache = TimingCache("attention", gpu="test GPU", grid=[2, 3, 4])
    assert cache.get_or_time("full {}", lambda: measured.append(1) or 1.5) == 1.5
    assert [p.name.startswith(".") for p in cache.path.parent.iterdir()] == [False]  # no temp file left over
    again = TimingCache("attention", gpu="test GPU", grid=[2, 3, 4])
    assert again.get_or_time("full {}", lambda: measured.append(2) or 9.0) == 1.5 and measured == [1]
    assert TimingCache("attention", gpu="other GPU", grid=[2, 3, 4]).path != cache.path
    cache.path.write_text('{"facts": {"kind": "attention"}, "timings": {"full {}": ')  # a torn write
    with pytest.warns(UserWarning, match="unreadable latency cache"):
        torn = TimingCache("attention", gpu="test GPU", grid=[2, 3, 4])
    assert torn.get_or_time("full {}", lambda: 2.5) == 2.5
    assert json.loads(cache.path.read_text())["timings"] == {"full {}": 2.5}


@pytest.mark.parametrize("command", [
    ["bench", "--repeats", "1"],
    ["eval", "--samples", "1", "--steps", "1"],
    ["generate", "--prompt", "a red square", "--steps", "1", "--out", "{tmp}/v.gif"],
])
def test_a_plan_for_another_grid_is_one_line_naming_both(command, tmp_path):
    plan = surgery.Plan.load(write_plan(tmp_path / "p.json", LayerChoice("vsa", VSAConfig(sparsity=0.75))))
    plan.grid = VideoGrid(3, 8, 8)  # planned at another video size than tiny's 6×10×10 default
    plan.save(tmp_path / "p.json")
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in command] + ["--plan", str(tmp_path / "p.json")])
    assert result.exit_code == 2, result.output
    assert "3×8×8" in result.stderr and "6×10×10" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]
