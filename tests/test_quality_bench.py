"""bench/quality.py in its smoke form: the whole sweep on the tiny model at a small video, a step of training."""

import json

import pytest

from .conftest import load_script


@pytest.mark.parametrize("jobs", [1, 2], ids=["in-process", "two-child-processes"])
def test_the_sweep_runs_and_writes_its_table_json_and_plot(tmp_path, jobs):
    doc = tmp_path / "quality.md"
    doc.write_text("# Quality\n\nprose before\n\n<!-- quality-table:start -->\nSTALE TABLE\n<!-- quality-table:end -->\n\nafter\n")
    bench = load_script("bench/quality.py")
    bench.main([
        # 200 tokens: enough for linear attention and VSA to cost less than dense; nothing fits 0.15.
        "--model", "tiny", "--frames", "5", "--height", "160", "--width", "160", "--budgets", "0.5", "0.15",
        "--methods", "planned-distilled", "vsa", "--set", "stage1.steps=1",
        "--set", "stage2.steps=1", "--set", "data.samples=2", "--set", "plan.samples=1", "--eval-samples", "1",
        "--eval-steps", "1", "--device", "cpu", "--out", str(tmp_path / "out"), "--doc", str(doc),
        "--plot", str(tmp_path / "front.png"), "--jobs", str(jobs),
    ])
    result = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert {(row["budget"], row["method"]) for row in result["rows"]} == {
        (b, m) for b in (0.5, 0.15) for m in ("planned-distilled", "vsa")}
    scored = {(row["budget"], row["method"]): set(row["levels"]) for row in result["rows"] if "levels" in row}
    assert scored == {(0.5, "planned-distilled"): {"stage 1", "stage 1 + 2"} | scored[0.5, "planned-distilled"],
                      (0.5, "vsa"): {"training-free", "stage 1", "stage 1 + 2"}}
    text = doc.read_text()
    assert text.startswith("# Quality\n\nprose before") and text.endswith("after\n") and "STALE TABLE" not in text
    assert "| 0.5 | planned-distilled |" in text and "| training-free | stage 1 | stage 1 + 2 |" in text
    assert (tmp_path / "front.png").read_bytes().startswith(b"\x89PNG")


def test_the_sweep_plans_every_method_with_the_recipes_dense_steps(tmp_path):
    from surgery.plan import Plan
    from surgery.sampling import dense_boundary

    bench = load_script("bench/quality.py")
    bench.main([
        "--model", "tiny", "--frames", "5", "--height", "160", "--width", "160", "--budgets", "0.6", "0.2",
        "--methods", "planned-init", "vsa", "--set", "plan.dense_steps=1", "--set", "plan.sampling_steps=4",
        "--set", "stage1.steps=1", "--set", "stage2.steps=0", "--set", "data.samples=2", "--set", "plan.samples=1",
        "--eval-samples", "1", "--eval-steps", "1", "--direction-seeds", "0", "--device", "cpu",
        "--out", str(tmp_path / "out"),
    ])
    result = json.loads((tmp_path / "out" / "quality.json").read_text())
    rows = {(row["budget"], row["method"]): row for row in result["rows"]}
    assert all(rows[0.6, m]["flops_ratio"] <= 0.6 for m in ("planned-init", "vsa"))
    assert "layers" not in rows[0.2, "vsa"]  # the dense quarter of the steps leaves nothing below 0.25
    assert Plan.load(tmp_path / "out" / "plans" / "planned-init@0.6.json").dense_boundary == dense_boundary(1, 4)
