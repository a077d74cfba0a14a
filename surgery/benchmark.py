"""`vsurgery bench`: what a retrofitted model gained — forward time against its teacher on this device,
next to the plan's attention FLOPs. Timings are measurements of this machine, never test assertions."""

from __future__ import annotations

import platform
import statistics
import time

import torch

from .swap import variant_processors
from .errors import SurgeryError
from .loading import load_config, load_model
from .model import default_text_tokens, resolve_grid
from .sensitivity import calibration_inputs
from .variants import dense_attention_flops
from .wan import fingerprint


def _median_ms(model, inputs: dict, repeats: int) -> float:
    sync = torch.cuda.synchronize if inputs["hidden_states"].is_cuda else (lambda: None)
    with torch.no_grad():
        model(**inputs)  # warm-up: allocation, kernel compilation
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            model(**inputs)
            sync()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def benchmark(student_spec: str, teacher_spec: str = "tiny", *, repeats: int = 5, frames=None, height=None,
              width=None, device=None, dtype=None) -> dict:
    """Median forward time (ms) of teacher and student on the same input, and the student's attention FLOPs."""
    if fingerprint(load_config(student_spec)) != fingerprint(load_config(teacher_spec)):
        raise SurgeryError(f"{student_spec} and {teacher_spec} are different architectures")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher = load_model(teacher_spec, device=device, dtype=dtype)
    student = load_model(student_spec, device=device, dtype=dtype)
    config = dict(teacher.config)
    grid = resolve_grid(teacher_spec, config, frames, height, width)
    inputs = calibration_inputs(teacher, grid, 1, 0, default_text_tokens(teacher_spec))[0]
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    dense = dense_attention_flops(grid.tokens, heads, head_dim) * config["num_layers"]
    converted = variant_processors(student)
    student_flops = dense - len(converted) * dense_attention_flops(grid.tokens, heads, head_dim) + sum(
        type(p).flops(p.observed_config(), grid, heads, head_dim) for p in converted.values()
    )
    teacher_ms, student_ms = _median_ms(teacher, inputs, repeats), _median_ms(student, inputs, repeats)
    return {
        "teacher": teacher_spec,
        "student": student_spec,
        "grid": grid.to_dict(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "repeats": repeats,
        "teacher_ms": teacher_ms,
        "student_ms": student_ms,
        "speedup": teacher_ms / student_ms,
        "attention_flops_ratio": student_flops / dense,
        "converted_layers": len(converted),
    }
