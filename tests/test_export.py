import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from typer.testing import CliRunner

import surgery
from surgery.cli.app import app
from surgery.errors import ModelLoadError
from surgery.exporting import export, rebuild_student
from surgery.manifest import MANIFEST, write_manifest
from surgery.retrofitted import WEIGHTS, load_exported
from surgery.grid import VideoGrid
from surgery.plan import Plan
from surgery.recipe import load_recipe
from surgery.train import distill

from .conftest import model_inputs

GRID = VideoGrid(6, 10, 10)
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A short LoRA run on the tiny model (all-full plan: export mechanics, not quality)."""
    run = tmp_path_factory.mktemp("run") / "run"
    config = surgery.load_config("tiny")
    plan = Plan.uniform("tiny", config, "full")
    plan.grid = GRID
    recipe = load_recipe("hybrid", ["stage2.steps=3", "stage2.lr=0.05", "stage2.flow_weight=1.0",
                                    "stage2.distill_weight=0.0"])
    distill("tiny", recipe, run, plan=plan)
    return run


def _forward(model, seed=0):
    with torch.no_grad():
        return model(**model_inputs(model, GRID, batch=1, seed=seed)).sample


@pytest.mark.parametrize("merge", [False, True])
def test_export_loads_back_in_a_fresh_process_through_diffusers(finished_run, tmp_path, merge):
    out = export(finished_run, tmp_path / "exported", merge_lora=merge)
    student, _, _ = rebuild_student(finished_run)
    expected = _forward(student)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from diffusers.models import ModelMixin
        from surgery.retrofitted import SurgeryWanTransformer3DModel
        from tests.conftest import model_inputs
        from surgery.grid import VideoGrid
        model = SurgeryWanTransformer3DModel.from_pretrained({str(out)!r})
        assert isinstance(model, ModelMixin)
        kinds = {{type(b.attn1.processor).__name__ for b in model.blocks}}
        with torch.no_grad():
            y = model(**model_inputs(model, VideoGrid(6, 10, 10), batch=1, seed=0)).sample
        torch.save(y, {str(tmp_path / 'y.pt')!r})
        print(sorted(kinds))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FullAttention" in result.stdout  # retrofitted processors, not stock WanAttnProcessor
    loaded = torch.load(tmp_path / "y.pt")
    assert (loaded - expected).abs().max().item() <= 1e-5
    # LoRA actually changed the weights: the export is not just the teacher.
    assert (expected - _forward(surgery.load_model("tiny"))).abs().max().item() > 1e-6


def test_stock_diffusers_class_refuses_an_export(finished_run, tmp_path):
    out = export(finished_run, tmp_path / "exported")
    with pytest.raises(OSError):
        WanTransformer3DModel.from_pretrained(out)


def test_missing_trained_keys_fail_loudly(finished_run, tmp_path):
    from safetensors.torch import load_file, save_file

    out = export(finished_run, tmp_path / "exported", merge_lora=True)
    weights = load_file(out / WEIGHTS)
    dropped = next(k for k in weights if "blocks.0.attn1.to_q" in k)
    del weights[dropped]
    save_file(weights, out / WEIGHTS)
    write_manifest(out)  # a consistent manifest, so the key check itself is what answers
    with pytest.raises(ModelLoadError, match="missing keys"):
        load_exported(out)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
@pytest.mark.parametrize("manifest", [True, False])
def test_corrupt_export_is_a_one_line_error(finished_run, tmp_path, damage, manifest):
    out = export(finished_run, tmp_path / "exported")
    if not manifest:  # an export written before exports had one: safetensors' own checks answer
        (out / MANIFEST).unlink()
    weights = out / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"not safetensors at all")
    with pytest.raises(ModelLoadError, match="the manifest says" if manifest else "not a readable safetensors"):
        surgery.load_model(str(out))


def test_the_manifest_catches_a_bit_flip_that_loading_alone_cannot(finished_run, tmp_path):
    out = export(finished_run, tmp_path / "exported")
    listed = json.loads((out / MANIFEST).read_text())["files"]
    assert set(listed) == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != MANIFEST}
    cli = CliRunner()
    result = cli.invoke(app, ["verify", str(out)])
    assert result.exit_code == 0 and f"{len(listed)} files match" in result.stdout, result.output
    weights = out / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-100] ^= 1  # inside the tensor data: the size and the header stay as they were
    weights.write_bytes(bytes(data))
    surgery.load_model(str(out))  # safetensors has no checksum: this loads
    with pytest.raises(ModelLoadError, match="does not match its SHA-256"):
        surgery.load_model(str(out), verify=True)
    for args in (["verify", str(out)],
                 ["generate", "--model", str(out), "--verify", "--prompt", "a", "--out", str(tmp_path / "v.gif")],
                 ["eval", "--student", str(out), "--verify"]):
        result = cli.invoke(app, args)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert "does not match its SHA-256" in result.stderr
    assert not (tmp_path / "v.gif").exists()
    result = cli.invoke(app, ["verify", "tiny"])
    assert result.exit_code == 2 and "tiny is not an export folder" in result.stderr


def test_export_refuses_an_unfinished_run_and_existing_output(finished_run, tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "run.json").write_text(json.dumps({"model": "tiny", "finished": False}))
    with pytest.raises(surgery.SurgeryError, match="has not finished"):
        export(tmp_path / "half", tmp_path / "x")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(surgery.SurgeryError, match="already exists and is not empty; pass --force"):
        export(finished_run, tmp_path / "taken")
    # --force replaces an earlier export, never a folder that is not one.
    with pytest.raises(surgery.SurgeryError, match="is not a diffusers folder"):
        export(finished_run, tmp_path / "taken", force=True)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists()


def test_export_force_replaces_an_earlier_export_and_an_empty_folder_counts_as_new(finished_run, tmp_path):
    (tmp_path / "empty").mkdir()
    export(finished_run, tmp_path / "empty")
    assert (tmp_path / "empty" / MANIFEST).is_file()
    (tmp_path / "empty" / "stale.txt").write_text("from before")
    export(finished_run, tmp_path / "empty", force=True)
    assert not (tmp_path / "empty" / "stale.txt").exists() and (tmp_path / "empty" / WEIGHTS).is_file()


def test_pipeline_export_loads_through_wan_pipeline(tmp_path):
    from diffusers import WanPipeline

    from surgery.pipeline import build_tiny_pipeline

    build_tiny_pipeline().save_pretrained(tmp_path / "pipe")
    spec = str(tmp_path / "pipe")
    plan = Plan.uniform(spec, surgery.load_config(spec), "full")
    plan.grid = GRID
    distill(spec, load_recipe("hybrid", ["stage2.steps=1"]), tmp_path / "run", plan=plan)
    out = export(tmp_path / "run", tmp_path / "exported")
    assert {"vae", "text_encoder", "tokenizer", "scheduler", "transformer"} <= {p.name for p in out.iterdir()}
    pipe = WanPipeline.from_pretrained(out)
    assert type(pipe.transformer).__name__ == "SurgeryWanTransformer3DModel"
    assert surgery.variant_processors(pipe.transformer)
    frames = pipe("a red square", num_frames=5, height=32, width=32, num_inference_steps=1,
                  max_sequence_length=16, output_type="np").frames
    assert frames.shape == (1, 5, 32, 32, 3)


def test_bench_reports_flops_and_times_without_asserting_speed(finished_run, tmp_path):
    from surgery.benchmark import benchmark

    out = export(finished_run, tmp_path / "exported")
    report = benchmark("tiny", student=str(out), repeats=1)
    assert report.attention_flops_ratio == pytest.approx(1.0)  # the all-full plan of this run
    assert report.converted_layers == 0  # `full` on every layer: nothing was converted
    assert [row.name for row in report.rows] == ["stock (SDPA default)", "attention core skipped", "student"]
    assert all(row.step_ms > 0 for row in report.rows)
