"""`vsurgery`: one short function per command; each parses, calls the library once and prints."""

from __future__ import annotations

import functools

import typer

from surgery.errors import SurgeryError

from . import options as opt
from . import output

app = typer.Typer(
    help="Retrofit Wan2.1 video diffusion transformers with cheaper self-attention.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root():
    """Plan, apply, distill and export cheaper self-attention for Wan2.1 transformers."""


def command(fn):
    """Register a command whose SurgeryError becomes one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SurgeryError as e:
            output.fail(str(e))

    return app.command()(wrapper)


@command
def info(
    model: opt.Model = "tiny",
    frames: opt.Frames = None,
    height: opt.Height = None,
    width: opt.Width = None,
    json: opt.Json = False,
):
    """Show the model: layers, heads, token grid and where a forward's FLOPs go."""
    from surgery.info import model_info

    result = model_info(model, frames, height, width)
    output.print_json(result) if json else output.show_info(result)


def main() -> None:
    app()
