"""Timing on this device, shared by `bench` and the latency planner: medians of CUDA-event (or wall-clock)
timings after a warm-up, peak GPU memory, and the model with its self-attention core skipped — the
ceiling any attention change can reach. Timings are measurements of this machine, never test assertions."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Iterator

import torch

from .swap import install_processors, self_attention_modules
from .variants.base import AttentionVariant, VariantConfig


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median wall time of `fn()` in ms over `repeats` calls after `warmup` untimed ones; on CUDA measured
    with events around each call (the GPU's time, launch queueing included)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Yields a dict whose "gib" is, on exit, the peak GPU memory allocated inside (None off CUDA)."""
    result: dict = {"gib": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield result
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result["gib"] = torch.cuda.max_memory_allocated(device) / 2**30


class _SkippedCoreConfig(VariantConfig):
    """No settings."""


class SkippedCore(AttentionVariant):
    """Wan's self-attention with the core (softmax(QKᵀ)V) left out: projections, norms, RoPE and the output
    projection still run, and the values pass through. Not a variant anyone should use: a yardstick."""

    name = "skipped-core"
    Config = _SkippedCoreConfig

    @classmethod
    def flops(cls, config, grid, heads, head_dim) -> float:
        return 0.0

    def attend_reference(self, q, k, v, grid, x=None):
        return v


@contextlib.contextmanager
def attention_core_skipped(model) -> Iterator[None]:
    """Within the block, every self-attention layer of `model` skips its core; its processors come back after."""
    processors = {
        fqn: SkippedCore.from_dense(attn, _SkippedCoreConfig(), layer_index=i)
        for i, (fqn, attn) in enumerate(self_attention_modules(model).items())
    }
    replaced = install_processors(model, processors)
    try:
        yield
    finally:
        install_processors(model, replaced)
