"""The docs agree with the code: README's CLI table and Python example run, and no text talks about how the
project was built."""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from surgery.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# One row per command line: | `vsurgery ...` | what it does |
CLI_ROWS = re.findall(r"^\| `vsurgery ([^`]+)` \|", README, re.M)
# Words about the making of the project, not about the product.
BUILD_TALK = r"session [0-9]+|issue #?[0-9]+|device (call|tool)|carry"

runner = CliRunner()


def test_readme_has_a_cli_table():
    assert len(CLI_ROWS) >= 8, CLI_ROWS


@pytest.mark.parametrize("line", CLI_ROWS)
def test_readme_cli_row_parses(line):
    """Every row runs with --help appended, and every --option it names is one of its command's options."""
    argv = shlex.split(line.replace("[", " ").replace("]", " "))
    result = runner.invoke(app, argv + ["--help"], terminal_width=200)
    assert result.exit_code == 0, f"vsurgery {line} --help:\n{result.output}"
    command_help = runner.invoke(app, [argv[0], "--help"], terminal_width=200).output
    offered = set(re.findall(r"--[a-z][a-z0-9-]*", command_help))
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line))
    assert named <= offered, f"vsurgery {argv[0]} has no {sorted(named - offered)}"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes plan.json
    example = re.search(r"## Python API\n+```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert (tmp_path / "plan.json").exists()


def _git_checkout() -> bool:
    if shutil.which("git") is None:
        return False
    probe = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip() == "true"


@pytest.mark.skipif(not _git_checkout(), reason="needs a git checkout")
def test_no_words_about_how_the_project_was_built():
    this_file = Path(__file__).resolve().relative_to(ROOT).as_posix()
    found = subprocess.run(
        ["git", "grep", "--untracked", "-n", "-I", "-i", "-E", BUILD_TALK, "--", ".", f":!{this_file}"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert found.returncode in (0, 1), found.stderr  # 1: no match
    assert found.stdout == "", "build talk in:\n" + found.stdout
