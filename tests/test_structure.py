"""The package's shape: no import loop inside `surgery`, a CLI that starts without torch, one wheel package."""

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder → the import package it installs as (pyproject.toml's package-dir).
SOURCES = {"surgery": ROOT / "surgery", "surgery.cli": ROOT / "cli", "surgery.recipes": ROOT / "recipes"}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            if name.split(".")[:2] != ["surgery", "cli"] or package == "surgery.cli":
                modules[name] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of the package that `name` imports anywhere in its source (functions included),
    with the packages a submodule import runs on the way; the lazy root package face is left out."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                targets.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else base)
            visit(child)

    visit(ast.parse(path.read_text()))
    edges = set()
    for target in targets:
        parts = target.split(".")
        for i in range(2, len(parts) + 1):  # surgery.a.b runs surgery.a first, unless `name` is inside it
            prefix = ".".join(parts[:i])
            if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                edges.add(prefix)
    return edges


def test_the_package_has_no_import_loop():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, str] = {}
    path: list[str] = []

    def walk(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                loop = path[path.index(nxt):] + [nxt]
                pytest.fail("import loop: " + " → ".join(loop))
            if nxt not in state:
                walk(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert "surgery.loading" in graph and "surgery.cli.app" in graph  # the walk saw the whole package


def test_cli_help_imports_neither_torch_nor_diffusers():
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from surgery.cli.app import app\n"
        "for args in (['--help'], ['plan', '--help'], ['distill', '--help'], ['run', '--help'], ['verify', '--help'],\n"
        "             ['plan', '--budget', 'x']):\n"
        "    CliRunner().invoke(app, args)\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'triton', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_wheel_installs_one_import_package(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0 and "No module named" in result.stderr:
        pytest.skip(f"cannot build without isolation here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("vsurgery-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.startswith("vsurgery-")}
    assert top_level == {"surgery"}
    for expected in ("surgery/cli/app.py", "surgery/recipes/hybrid.toml", "surgery/__main__.py",
                     "surgery/assets/toy/transformer/config.json"):
        assert expected in names
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "surgery").rglob("__init__.py")}
    assert all(f"{p}/__init__.py" in names for p in packages), "a subpackage is missing from pyproject's list"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "vsurgery = surgery.cli.app:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_package_face_lists_what_it_exports():
    import surgery

    assert sorted(surgery.__all__) == sorted(surgery._EXPORTS)
    assert all(getattr(surgery, name) is not None for name in surgery.__all__)
