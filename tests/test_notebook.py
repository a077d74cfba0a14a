"""notebooks/tour.ipynb runs top to bottom on the tiny model, and ships with small, plain outputs."""

import ast
import json
import tempfile
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "tour.ipynb"
SHIPPED_OUTPUT_TYPES = {"text/plain", "text/html", "image/png"}


def code_cells(notebook: dict) -> list[dict]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def run_cell(source: str, namespace: dict, name: str):
    """Run a cell as Jupyter does: the statements, then the value of a final expression (or None)."""
    tree = ast.parse(source, filename=name)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, name, "exec"), namespace)
    if last is not None:
        return eval(compile(ast.Expression(last.value), name, "eval"), namespace)


def test_tour_runs_in_order_on_tiny(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the tour's run folders land here
    namespace: dict = {}
    results = [run_cell("".join(cell["source"]), namespace, f"tour.ipynb cell {i}")
               for i, cell in enumerate(code_cells(json.loads(NOTEBOOK.read_text())))]
    html = [r._repr_html_() for r in results if hasattr(r, "_repr_html_")]
    pngs = [r._repr_png_() for r in results if hasattr(r, "_repr_png_")]
    assert html and "<table>" in html[0], "the plan as a table"
    assert pngs and pngs[0].startswith(b"\x89PNG"), "one picture"
    assert namespace["report"].psnr_db > 0


def test_tour_ships_with_small_plain_outputs():
    notebook = json.loads(NOTEBOOK.read_text())
    outputs = [output for cell in code_cells(notebook) for output in cell["outputs"]]
    shipped_types = {kind for output in outputs for kind in output.get("data", {})}
    assert all(cell["outputs"] for cell in code_cells(notebook)), "run the notebook before committing it"
    assert {"text/html", "image/png"} <= shipped_types <= SHIPPED_OUTPUT_TYPES
    assert not [o for o in outputs if o["output_type"] == "error" or o.get("name") == "stderr"]
    assert NOTEBOOK.stat().st_size < 300_000
