"""Fault injection on distill runs: SIGKILL inside each stage, a torn metrics line, a truncated newest
checkpoint, a second run into a busy folder — each resumed run ends bit-identical to an uninterrupted one."""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from surgery.cli.app import app
from surgery.errors import SurgeryError
from surgery.lock import LOCK_NAME
from surgery.recipe import load_recipe
from surgery.train import distill
from surgery.train.loop import StopRequested

from .conftest import small_plan

STAGE1_STEPS, STAGE2_STEPS = 16, 8
RECIPE = [f"stage1.steps={STAGE1_STEPS}", f"stage2.steps={STAGE2_STEPS}", "train.checkpoint_every=3",
          "data.samples=4"]


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def straight(tmp_path_factory, one_thread):
    """The uninterrupted run's student and metrics steps."""
    out = tmp_path_factory.mktemp("straight") / "run"
    distill("tiny", load_recipe("hybrid", RECIPE), out, plan=small_plan())
    return load_file(out / "student.safetensors")


def assert_same_as_straight(run, straight):
    student = load_file(run / "student.safetensors")
    assert student.keys() == straight.keys()
    for key in straight:
        assert torch.equal(student[key], straight[key]), key
    steps = [(e["stage"], e["step"]) for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert steps == [("stage1", i) for i in range(1, STAGE1_STEPS + 1)] + [("stage2", i) for i in range(1, STAGE2_STEPS + 1)]
    assert not (run / LOCK_NAME).exists()


def logged_steps(run, stage):
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if f'"stage": "{stage}"' in line)


def start_cli_distill(run, *args):
    log = open(run.parent / f"{run.name}.{time.monotonic_ns()}.log", "w")  # a file: a full pipe would stall it
    return subprocess.Popen([sys.executable, "-m", "surgery", "distill", "--out", str(run), *args],
                            stdout=subprocess.DEVNULL, stderr=log)


def wait_for(process, condition, what):
    deadline = time.monotonic() + 300
    while not condition():
        assert process.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"no {what} in 300 s"
        time.sleep(0.01)


def kill_at(process, run, stage, step):
    """SIGKILL `process` once its metrics show `step` steps of `stage` (it is then somewhere in the next)."""
    wait_for(process, lambda: logged_steps(run, stage) >= step, f"{stage} step {step}")
    process.send_signal(signal.SIGKILL)
    process.wait()  # reaped: its pid no longer runs, so its lock is stale


def test_sigkill_in_each_stage_then_resume_equals_the_uninterrupted_run(tmp_path, straight):
    rng = random.Random()
    # Steps to spare after each kill point: the kill lands in the stage even if the poll below runs late.
    stage1_kill, stage2_kill = rng.randint(1, STAGE1_STEPS - 8), rng.randint(1, STAGE2_STEPS - 5)
    print(f"SIGKILL after stage-1 step {stage1_kill}, then after stage-2 step {stage2_kill}")
    small_plan().save(tmp_path / "plan.json")
    run = tmp_path / "run"
    sets = [arg for assignment in RECIPE for arg in ("--set", assignment)]
    first = start_cli_distill(run, "--plan", str(tmp_path / "plan.json"), *sets)
    wait_for(first, lambda: logged_steps(run, "stage1") >= 1, "a first step")
    first.send_signal(signal.SIGSTOP)  # paused (still holding its lock) while a second run tries the folder
    second = CliRunner().invoke(app, ["distill", "--out", str(run), "--resume"])
    first.send_signal(signal.SIGCONT)
    assert second.exit_code == 2 and "in use by another vsurgery process" in second.stderr, second.output
    assert len(second.stderr.strip().splitlines()) == 1
    kill_at(first, run, "stage1", stage1_kill)
    # The killed run's lock is stale: the resumed run takes it over.
    resumed = start_cli_distill(run, "--resume")
    kill_at(resumed, run, "stage2", stage2_kill)
    distill("tiny", load_recipe("hybrid"), run, resume=True)
    assert_same_as_straight(run, straight)


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, straight, caplog):
    run = tmp_path / "run"
    with pytest.raises(StopRequested):
        distill("tiny", load_recipe("hybrid", RECIPE), run, plan=small_plan(), stop_after=5)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"stage": "stage1", "step": 6, "lr": 0.0')  # a kill in the middle of an append
    with caplog.at_level(logging.WARNING, logger="surgery"):
        distill("tiny", load_recipe("hybrid"), run, resume=True)
    assert "cut short" in caplog.text
    assert_same_as_straight(run, straight)


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path, straight, caplog):
    run = tmp_path / "run"
    with pytest.raises(StopRequested):
        distill("tiny", load_recipe("hybrid", RECIPE), run, plan=small_plan(), stop_after=8)
    checkpoints = run / "checkpoints" / "stage1"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000006", "step-000008"]  # every 3, and the stop
    params = checkpoints / "step-000008" / "params.safetensors"
    params.write_bytes(params.read_bytes()[: params.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="surgery"):
        distill("tiny", load_recipe("hybrid"), run, resume=True)
    assert "cannot read checkpoint" in caplog.text and "step-000008" in caplog.text
    assert "resuming from" in caplog.text and "step-000006" in caplog.text
    assert_same_as_straight(run, straight)


def test_a_lock_held_by_a_live_process_is_respected_and_a_killed_ones_is_taken_over(tmp_path, monkeypatch):
    from surgery.lock import FolderBusy, check_not_busy, folder_lock

    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom surgery.lock import folder_lock\n"
         f"with folder_lock({str(folder)!r}):\n    print('locked', flush=True)\n    time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderBusy, match=f"pid {holder.pid}"):
            with folder_lock(folder):
                pass
        with monkeypatch.context() as patch:  # the other processes of a launch work under rank 0's lock
            patch.setenv("RANK", "1")
            check_not_busy(folder)
            with folder_lock(folder):
                pass
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(folder):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (folder / LOCK_NAME).exists()


def test_a_rejected_run_removes_the_folders_its_lock_created(tmp_path):
    plan = small_plan()
    plan.layers["blocks.99.attn1"] = plan.layers["blocks.1.attn1"]
    with pytest.raises(SurgeryError, match="not a self-attention layer"):
        distill("tiny", load_recipe("hybrid", RECIPE), tmp_path / "new" / "run", plan=plan)
    assert not any(tmp_path.iterdir())
