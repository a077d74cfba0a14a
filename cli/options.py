"""Options shared by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from surgery.errors import SurgeryError

Model = Annotated[
    str,
    typer.Option(
        "--model", "-m",
        help="The model (eval and bench: the teacher): 'tiny' (built in, random weights), 'toy' (a small trained "
        "teacher, shipped), a tiny form of another Wan kind (tiny-wan2.1-i2v, tiny-wan2.2, tiny-wan2.2-i2v, "
        "tiny-wan2.2-ti2v), a preset (wan2.1-t2v-1.3b, wan2.1-t2v-14b, wan2.1-i2v-14b-480p, wan2.1-i2v-14b-720p, "
        "wan2.2-t2v-a14b, wan2.2-i2v-a14b, wan2.2-ti2v-5b), a diffusers folder or a hub id; one expert of a "
        "two-expert model as MODEL@transformer_2.",
    ),
]
Frames = Annotated[Optional[int], typer.Option(help="Video frames (4k+1 for Wan's VAE); default: the model's.")]
Height = Annotated[Optional[int], typer.Option(help="Video height in pixels (multiple of 16); default: the model's.")]
Width = Annotated[Optional[int], typer.Option(help="Video width in pixels (multiple of 16); default: the model's.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON to stdout instead of a table.")]
TrainingFreePlan = Annotated[
    Optional[Path],
    typer.Option("--plan", help="A plan JSON applied to --model with no distillation (training-free variants only)."),
]
ContextParallel = Annotated[int, typer.Option(
    "--cp", min=1,
    help="Context-parallel processes (Ulysses): run under a launch of that many, e.g. torchrun --nproc_per_node N; "
         "must divide the model's attention heads.")]
BudgetPerExpert = Annotated[bool, typer.Option(
    "--budget-per-expert",
    help="Two-expert models: the budget holds for each expert alone, not for the sampling run (where each "
         "expert's attention counts by the steps it serves).")]
Image = Annotated[Optional[Path], typer.Option(
    help="The first frame (an image file) of an image-to-video model (required there) or of Wan2.2 TI2V (optional).")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing --out (without it, an existing output is refused).")]
Verify = Annotated[
    bool, typer.Option("--verify", help="Check the export's files against its SHA-256 manifest before loading.")
]


def split_names(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def split_ints(value: str | None, option: str) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise SurgeryError(f"{option} takes comma-separated integers, got {value!r}") from None
