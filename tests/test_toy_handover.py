"""scripts/toy_handover.py: a handover at step 0 or after the last step is one model's own sampling."""

import math

import torch

from surgery.loading import load_model
from surgery.metrics import psnr
from surgery.model import resolve_grid
from surgery.toy import decode_unit
from surgery.trajectories import sample_latents, sampling_starts

from .conftest import load_script


def test_handover_at_the_ends_is_the_student_or_the_teacher_alone():
    handover = load_script("scripts/toy_handover.py")
    teacher, student = load_model("toy"), load_model("toy")
    with torch.no_grad():
        for p in student.blocks[2].parameters():
            p.add_(0.05 * torch.randn_like(p))  # a student that samples a different video
    grid = resolve_grid("toy", dict(teacher.config))
    starts, _ = sampling_starts(teacher, "toy", grid, 1, 100, ["a red cross moving left to right"])
    scores = handover.handover_psnr(teacher, student, starts, 2, [0, 2], decode_unit)
    with torch.no_grad():
        teacher_video = decode_unit(sample_latents(teacher, steps=2, **starts[0])[0])[0]
        student_alone = psnr(teacher_video, decode_unit(sample_latents(student, steps=2, **starts[0])[0])[0])
    assert math.isfinite(student_alone)
    assert scores["student from step 0"] == scores["teacher from step 2"] == student_alone
    assert math.isinf(scores["student from step 2"]) and math.isinf(scores["teacher from step 0"])
