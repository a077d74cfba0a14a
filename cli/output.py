"""All terminal output: rich tables and --json. The library never prints."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2):
    """One line on stderr, then exit: the contract for bad input."""
    import typer

    err_console.print(f"error: {message}", markup=False)
    raise typer.Exit(code)


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def human_flops(flops: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOP"


def key_value_table(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def show_info(info: dict) -> None:
    grid = info["grid"]
    key_value_table(
        f"{info['model']} (config {info['fingerprint']})",
        [
            ("layers", str(info["layers"])),
            ("heads × head_dim", f"{info['heads']} × {info['head_dim']} (dim {info['dim']})"),
            ("grid (T×H×W)", f"{grid['frames']}×{grid['height']}×{grid['width']}"),
            ("tokens", f"{info['tokens']:,}"),
            ("text tokens", str(info["text_tokens"])),
            ("self-attention FLOPs / layer", human_flops(info["self_attention_flops_per_layer"])),
            ("self-attention FLOPs / forward", human_flops(info["self_attention_flops"])),
            ("forward FLOPs", human_flops(info["forward_flops"])),
            ("self-attention share", f"{info['self_attention_share']:.1%}"),
        ],
    )
