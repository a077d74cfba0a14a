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


def warmup_calls(compiled: bool) -> int:
    """Untimed calls before timing a model: a compiled one's first call compiles, its second settles autotuning."""
    return 2 if compiled else 1


def compile_blocks(model, **options) -> None:
    """Compile `model`'s transformer blocks (diffusers' regional compilation, whole-graph): each kind of block
    (stock, or each variant a plan uses) compiles a graph of its own, so the recompile limit leaves room for them
    all. `options` go to torch.compile (e.g. backend)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    model.compile_repeated_blocks(fullgraph=True, **options)


@contextlib.contextmanager
def blocks_compiled(model, **options) -> Iterator[None]:
    """Within, `model`'s blocks run compiled (`compile_blocks`); after, as they ran before."""
    # nn.Module.compile keeps the compiled call in `_compiled_call_impl` (None: eager): put back what was there.
    before = {module: module._compiled_call_impl for module in model.modules()}
    compile_blocks(model, **options)
    try:
        yield
    finally:
        for module, call in before.items():
            module._compiled_call_impl = call


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


@torch.library.custom_op("vsurgery::skipped_core", mutates_args=())
def skipped_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A copy of v that takes q and k too: an opaque op, so that torch.compile cannot drop q's and k's projections,
    norms and RoPE as dead code, which returning v itself would let it do (the attention-free step would then
    skip more than the core). The copy stands for writing the attention output, which any core does."""
    return v.clone()


@skipped_core.register_fake
def _(q, k, v):
    return torch.empty_like(v)


def _skipped_core_backward(ctx, grad):
    # Zeros for q and k rather than none: their projections' backward runs in a training step's yardstick too.
    return torch.zeros(ctx.q_shape, dtype=grad.dtype, device=grad.device), \
        torch.zeros(ctx.k_shape, dtype=grad.dtype, device=grad.device), grad


def _skipped_core_setup(ctx, inputs, output):
    q, k, _ = inputs
    ctx.q_shape, ctx.k_shape = q.shape, k.shape


skipped_core.register_autograd(_skipped_core_backward, setup_context=_skipped_core_setup)


class SkippedCore(AttentionVariant):
    """Wan's self-attention with the core (softmax(QKᵀ)V) left out: projections, norms, RoPE and the output
    projection still run, and the values pass through (`skipped_core`). Not a variant anyone should use: a
    yardstick."""

    name = "skipped-core"
    Config = _SkippedCoreConfig

    @classmethod
    def flops(cls, config, grid, heads, head_dim) -> float:
        return 0.0

    def attend_reference(self, q, k, v, grid, x=None):
        return skipped_core(q, k, v)


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
