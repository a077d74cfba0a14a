import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from surgery.cli.app import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def assert_one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_help_lists_the_commands():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("info", "plan", "distill", "export", "generate", "eval", "bench", "run"):
        assert command in result.stdout


def test_info_json_is_valid():
    result = run("info", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["model"] == "tiny" and info["tokens"] == 600


def test_info_table_mentions_share():
    result = run("info", "--model", "wan2.1-t2v-14b")
    assert result.exit_code == 0 and "self-attention share" in result.stdout


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["info", "--frames", "80"], "--frames must be"),
        (["info", "--model", "does-not-exist"], "unknown model"),
        (["plan", "--budget", "1.5"], "--budget must be in (0, 1]"),
        (["plan", "--keep-full", "a,b"], "--keep-full takes comma-separated integers"),
        (["distill", "--recipe", "no-such-recipe"], "no recipe named 'no-such-recipe'"),
        (["distill", "--set", "stage1.stepz=3"], "unknown key 'stepz'"),
        (["export", "--run", "/nonexistent/run"], "is not a distill run folder"),
        (["generate", "--prompt", "a red square", "--out", "video.avi"], "--out must end in .mp4 or .gif"),
        (["eval", "--student", "wan2.1-t2v-1.3b"], "different architectures"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, fragment):
    assert_one_line_error(run(*args), fragment)


def test_bad_folders_are_one_line_and_exit_2(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"broken")
    # `info` only reads the config; loading commands read the weights (checked in test_model).
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, _class_name="FluxTransformer2DModel")))
    assert_one_line_error(run("info", "--model", str(tmp_path)), "FluxTransformer2DModel")


def test_console_script_reports_errors_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "surgery", "info", "--height", "17"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --height must be a positive multiple of 16, got 17"]


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_damaged_weights_are_one_line_and_exit_2_for_commands_that_load_them(tiny_model, tmp_path, damage):
    tiny_model.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    if damage == "corrupt":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.unlink()
    fragment = "not a readable safetensors" if damage == "corrupt" else "no weights to load"
    assert_one_line_error(run("plan", "--model", str(tmp_path), "--out", str(tmp_path / "p.json")), fragment)
    assert not (tmp_path / "p.json").exists()
