"""Bad destinations and rejected runs: one line, exit code 2, checked before any work, nothing written;
outputs with the user's umask; Ctrl-C says how to continue; `run --resume`."""

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import surgery
from surgery.cli.app import app
from surgery.plan import Plan

runner = CliRunner()
distill_module = importlib.import_module("surgery.train.distill")  # the package re-exports the function


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


@pytest.fixture
def no_work(monkeypatch):
    """Make every expensive step fail loudly: a destination check that comes after the work shows up."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the work started before the destination was checked")

    import surgery.evaluate
    import surgery.exporting
    import surgery.planner

    monkeypatch.setattr(surgery.planner, "make_plan", forbidden)
    monkeypatch.setattr(surgery.evaluate, "generate_video", forbidden)
    monkeypatch.setattr(surgery.exporting, "rebuild_student", forbidden)
    monkeypatch.setattr(distill_module, "load_model", forbidden)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nothing can be written in: a read-only mount for root (who ignores modes), mode 0555 otherwise."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("root cannot mount a read-only filesystem here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_destinations_of_the_wrong_kind_fail_before_any_work(tmp_path, no_work):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "folder").mkdir()
    (tmp_path / "clip.gif").mkdir()
    assert_one_line_error(run("distill", "--out", tmp_path / "file"), "is a file, not a folder")
    assert_one_line_error(run("export", "--run", tmp_path, "--out", tmp_path / "file"), "is a file, not a folder")
    assert_one_line_error(run("plan", "--out", tmp_path / "folder"), "is a folder; give a file name")
    assert_one_line_error(run("generate", "--prompt", "a", "--out", tmp_path / "clip.gif"), "is a folder")
    assert (tmp_path / "file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif", "file", "folder"]


def test_read_only_destinations_fail_before_any_work(read_only_dir, no_work):
    for args in (["plan", "--out", read_only_dir / "plan.json"],
                 ["distill", "--out", read_only_dir / "runs" / "r"],
                 ["export", "--run", read_only_dir, "--out", read_only_dir / "exported"],
                 ["generate", "--prompt", "a", "--out", read_only_dir / "clip.gif"]):
        result = run(*args)
        assert_one_line_error(result, f"cannot write in {read_only_dir}")
        assert "read-only filesystem" in result.stderr or "no write permission" in result.stderr


def test_existing_outputs_are_refused_unless_force(tmp_path, monkeypatch):
    import surgery.evaluate
    import surgery.planner

    plan = Plan.uniform("tiny", surgery.load_config("tiny"), "full")
    monkeypatch.setattr(surgery.planner, "make_plan", lambda *args, **kwargs: plan)
    monkeypatch.setattr(surgery.evaluate, "generate_video", lambda *args, **kwargs: np.zeros((2, 16, 16, 3)))
    for command, name in (["plan", "--json"], "plan.json"), (["generate", "--prompt", "a"], "clip.gif"):
        (tmp_path / name).write_text("mine")
        assert_one_line_error(run(*command, "--out", tmp_path / name), "already exists; pass --force")
        assert (tmp_path / name).read_text() == "mine"
        assert run(*command, "--out", tmp_path / name, "--force").exit_code == 0
        assert (tmp_path / name).read_bytes() != b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif", "plan.json"]  # no temporary files


def test_a_failed_video_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import imageio.v3 as iio

    from surgery.evaluate import write_video

    def disk_full(path, *args, **kwargs):
        open(path, "wb").write(b"half a gif")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(iio, "imwrite", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_video(np.zeros((2, 16, 16, 3)), tmp_path / "clip.gif")
    assert not any(tmp_path.iterdir())


def _plan_file(tmp_path, name, edit):
    plan = Plan.uniform("tiny", surgery.load_config("tiny"), "full")
    plan.grid = surgery.VideoGrid(2, 4, 4)
    edit(plan)
    return plan.save(tmp_path / name)


def _rename_layer(old, new):
    def edit(plan):
        plan.layers[new] = plan.layers.pop(old)
    return edit


@pytest.mark.parametrize(
    "case,fragment",
    [
        (["--plan", "blocks.99"], "'blocks.99.attn1' is not a self-attention layer"),
        (["--plan", "blocks.-1"], "'blocks.-1.attn1' is not a self-attention layer"),
        (["--plan", "attn2"], "'blocks.0.attn2' is not a self-attention layer"),
        (["--plan", "toy"], "the plan is for a model with 6 layers"),
        (["--set", "data.source=toy"], "use it with --model toy"),
        (["--set", "data.source=dataset", "--set", "data.path=/nonexistent/dataset"], "cannot load dataset"),
        (["--set", "stage1.lr=nan"], "stage1.lr must be a finite number"),
        (["--set", "train.checkpoint_every=0"], "checkpoint_every must be ≥ 1"),
    ],
)
def test_a_rejected_distill_writes_nothing(tmp_path, case, fragment):
    plans = {
        "blocks.99": _rename_layer("blocks.3.attn1", "blocks.99.attn1"),
        "blocks.-1": _rename_layer("blocks.3.attn1", "blocks.-1.attn1"),
        "attn2": _rename_layer("blocks.0.attn1", "blocks.0.attn2"),
    }
    if case[0] == "--plan" and case[1] == "toy":
        args = ["--plan", Plan.uniform("toy", surgery.load_config("toy"), "full").save(tmp_path / "toy.json")]
    elif case[0] == "--plan":
        args = ["--plan", _plan_file(tmp_path, "plan.json", plans[case[1]])]
    else:
        args = ["--plan", _plan_file(tmp_path, "plan.json", lambda p: None), *case]
    out = tmp_path / "runs" / "r"
    assert_one_line_error(run("distill", "--out", out, *args), fragment)
    assert not (tmp_path / "runs").exists()  # so a corrected rerun into the same --out is a new run


def test_recipe_errors_are_one_line_from_the_console_script_with_nothing_written(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "surgery", "distill", "--set", "train.checkpoint_every=0", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: recipe hybrid.train: checkpoint_every must be ≥ 1, got 0"]
    assert not any(tmp_path.iterdir())


def test_distill_force_replaces_only_a_run_folder_and_resume_excludes_force(tmp_path, no_work):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert_one_line_error(run("distill", "--out", tmp_path / "mine"), "pass --force to replace it, or --resume")
    assert_one_line_error(run("distill", "--out", tmp_path / "mine", "--force"), "is not a run folder")
    assert_one_line_error(run("distill", "--out", tmp_path / "mine", "--force", "--resume"), "pass one of them")
    assert_one_line_error(run("distill", "--out", tmp_path / "mine", "--resume"), "is not a run folder (no run.json)")
    (tmp_path / "mine" / "run.json").write_text("{not json")
    assert_one_line_error(run("distill", "--out", tmp_path / "mine", "--resume"), "cannot read run info")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt", "run.json"]


@pytest.mark.parametrize("option", ["--frames", "--height", "--width"])
def test_zero_sizes_are_errors_not_the_default(option):
    assert_one_line_error(run("info", option, "0"), f"{option} must be")


def test_the_toy_frame_rule_is_its_own():
    assert_one_line_error(run("info", "--model", "toy", "--frames", "0"), "--frames must be positive, got 0")
    assert run("info", "--model", "toy", "--frames", "7").exit_code == 0  # one frame per latent frame


def test_a_missing_local_path_shaped_like_a_hub_id_names_both(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "model_info", offline)
    result = run("plan", "--model", "runs-typo/exported", "--out", tmp_path / "plan.json")
    assert_one_line_error(result, "'runs-typo/exported' is neither a local folder")
    assert "Hugging Face Hub" in result.stderr


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_follow_the_umask(tmp_path, mask):
    import torch

    from surgery.io import atomic_dir, atomic_save_safetensors

    old = os.umask(mask)
    try:
        plan = Plan.uniform("tiny", surgery.load_config("tiny"), "full").save(tmp_path / "plan.json")
        with atomic_dir(tmp_path / "exported") as folder:
            atomic_save_safetensors({"w": torch.zeros(2)}, folder / "weights.safetensors")
    finally:
        os.umask(old)
    assert (plan.stat().st_mode & 0o777, (tmp_path / "exported").stat().st_mode & 0o777) == (0o666 & ~mask, 0o777 & ~mask)
    assert (tmp_path / "exported" / "weights.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.usefixtures("one_thread")
def test_ctrl_c_says_how_to_continue_and_run_resume_finishes_the_job(tmp_path, monkeypatch):
    import surgery.run

    out = tmp_path / "demo"
    sets = ["--set", "plan.samples=1", "--set", "stage1.steps=2", "--set", "stage2.steps=2"]

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(distill_module, "train_stage2", interrupt)
        result = run("run", "--out", out, *sets)
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines()[-1] == f"interrupted; continue with: vsurgery run --out {out} --resume"
    with monkeypatch.context() as patch:  # resumed: the distillation finishes and exports, eval is cut short
        patch.setattr(surgery.run, "evaluate", interrupt)
        assert run("run", "--out", out, "--resume").exit_code == 130
    assert json.loads((out / "run.json").read_text())["finished"] and (out / "exported").is_dir()
    assert not (out / "summary.json").exists()
    written = (out / "exported" / "vsurgery_manifest.json").stat().st_mtime_ns
    result = run("run", "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert (out / "exported" / "vsurgery_manifest.json").stat().st_mtime_ns == written  # the export is kept
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distill"]["stage2_final_loss"] is not None
    assert_one_line_error(run("run", "--out", out), "pass --force to replace it, or --resume")
