"""Time the hybrid and linear attention paths against dense cuDNN SDPA, in one run on one GPU.

    python3 bench/hybrid.py [--sweep] [--json out.json]

Wan-1.3B's shape (21×30×52 = 32,760 tokens, batch 1, 12 heads × 128, F = 128, bf16), forward (under
torch.no_grad, as inference runs it, like bench/variants.py) and forward+backward, triton.testing.do_bench
medians. Rows: SDPA cuDNN (dense); one feature map φ over all
S tokens, the reference `FeatureMap.forward` and the fused kernel (`FeatureMap.forward_kernel`, backward
into x, W and b); the fused linear-attention op alone (`linear_attention`: φ_q, φ_k computed inside its
kernels; backward into q, k, v, W and b of both maps); the fused hybrid op alone (`hybrid_attention` on a
given φ_q and KV) at R = 4 and 8; the whole `hybrid` and `linear` variants' `attend_kernel` (hybrid: φ
through the fused kernel, summary, op; linear: the linear-attention op; backward into q, k, v and the φ
parameters); the hybrid rows twice, with the default backward (cuDNN's for the softmax branch) and under
`torch.use_deterministic_algorithms` (our Triton passes); and the yardstick "cuDNN dense / R + linear", the
time a perfect R-fold cut of dense attention plus the linear variant would take. TFLOP/s count the softmax
branch's 4·H·S·S'·D (fwd+bwd: 3.5× that). Peak: the most memory allocated during one fwd+bwd, above what the
inputs hold. `--sweep` first times launch configs of each kernel (the hybrid op's at R = 4) and keeps the
fastest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.memory import peak_gib  # noqa: E402
from bench.sweep import keep_fastest  # noqa: E402
from surgery.grid import VideoGrid  # noqa: E402
from surgery.kernels import feature_map as fm  # noqa: E402
from surgery.kernels import hybrid as hy  # noqa: E402
from surgery.kernels import linear_attention as la  # noqa: E402
from surgery.variants.feature_maps import FeatureMap  # noqa: E402
from surgery.variants.hybrid import HybridAttention, HybridConfig, linear_token_index  # noqa: E402
from surgery.variants.linear import LinearAttention, LinearConfig  # noqa: E402

GRID = VideoGrid(21, 30, 52)
HEADS, HEAD_DIM = 12, 128
DTYPE = torch.bfloat16


@contextlib.contextmanager
def deterministic():
    """`torch.use_deterministic_algorithms` on: the hybrid backward runs its own Triton passes, not cuDNN's."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def bench(fn, grad_to_none=None, rep=200):
    return do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def op_inputs(rate, requires_grad=True):
    """q, k, v, φ_q and KV for the op alone, as the variant makes them (φ positive, KV over the linear keys)."""
    S = GRID.tokens
    mk = lambda *shape: torch.randn(*shape, device="cuda", dtype=DTYPE)
    q, k, v = mk(1, S, HEADS, HEAD_DIM), mk(1, S, HEADS, HEAD_DIM), mk(1, S, HEADS, HEAD_DIM)
    index = linear_token_index(S, rate, torch.device("cuda"))
    phi_q = mk(1, S, HEADS, 2 * HEAD_DIM).softmax(-1)
    phi_k = mk(1, index.numel(), HEADS, 2 * HEAD_DIM).softmax(-1)
    kv = torch.einsum("blhf,blhe->bhfe", phi_k, F.pad(v[:, index], (0, 1), value=1.0))
    return [t.requires_grad_(requires_grad) for t in (q, k, v, phi_q, kv)]


def feature_map_inputs():
    """One φ as the variants hold it (identity init, bf16), x [1, S, H, D], and the tensors whose gradients
    the backward makes (x and the parameters)."""
    feature_map = FeatureMap(HEADS, HEAD_DIM, HEAD_DIM, 0).to("cuda", DTYPE)
    x = torch.randn(1, GRID.tokens, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, requires_grad=True)
    return feature_map, x, [x, *feature_map.parameters()]


def linear_op_call():
    """The linear-attention op on q, k, v and two feature maps' bf16 parameters (identity init), and the tensors
    whose gradients its backward makes."""
    S = GRID.tokens
    q, k, v = (torch.randn(1, S, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, requires_grad=True) for _ in range(3))
    maps = [FeatureMap(HEADS, HEAD_DIM, HEAD_DIM, 0).to("cuda", DTYPE) for _ in range(2)]
    params = [p for m in maps for p in (m.weight, m.bias)]
    return lambda: la.linear_attention(q, k, v, *params), [q, k, v, *params]


def sweep(log):
    """Time launch configs of each kernel, the hybrid op's at R = 4 (fwd alone, or fwd+bwd for the backward
    kernels and the linear op's summary kernel). One function per op, so each one's tensors are freed before
    the next."""
    sweep_hybrid(log)
    sweep_feature_map(log)
    sweep_linear(log)


def sweep_hybrid(log):
    inputs = op_inputs(4)
    do = torch.randn_like(inputs[0])
    forward_configs = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s) for bm, bn, w, s in
                       [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4)]]
    candidates = {
        "fwd": forward_configs,
        "fwd_inference": forward_configs,
        "dq": [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
               for bm, bn, w, s in [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2)]],
        "dkv": [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
                for bm, bn, w, s in [(64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2)]],
    }
    for name, configs in candidates.items():
        if name.startswith("fwd"):
            call = lambda: hy.hybrid_attention(*inputs, 4)
        else:
            call = lambda: hy.hybrid_attention(*inputs, 4).backward(do)
        # The dq and dkv kernels run only under deterministic algorithms; fwd_inference only without gradients.
        with deterministic(), torch.set_grad_enabled(name != "fwd_inference"):
            keep_fastest(log, "hybrid", hy.CONFIGS, name, configs, call, inputs)


def sweep_feature_map(log):
    feature_map, x, grads = feature_map_inputs()
    phi = feature_map.forward_kernel
    dphi = torch.randn(*x.shape[:-1], 2 * HEAD_DIM, device="cuda", dtype=DTYPE)
    configs = [dict(BLOCK_S=bs, num_warps=w) for bs in (32, 64, 128) for w in (4, 8)]
    keep_fastest(log, "feature map", fm.CONFIGS, "fwd", configs, lambda: phi(x), grads)
    keep_fastest(log, "feature map", fm.CONFIGS, "bwd", configs, lambda: phi(x).backward(dphi), grads)


def sweep_linear(log):
    call, grads = linear_op_call()
    do = torch.randn_like(grads[0])
    blocks = [dict(BLOCK_S=bs, num_warps=w) for bs, w in [(32, 4), (64, 4), (64, 8), (128, 8)]]
    summary = [dict(BLOCK_S=bs, BLOCK_D=bd, CHUNK_S=c, num_warps=w)
               for bs, bd, c, w in [(64, 64, 1024, 8), (32, 64, 1024, 4), (64, 128, 1024, 8), (64, 64, 512, 8),
                                    (64, 64, 2048, 8), (32, 128, 1024, 8)]]
    keep_fastest(log, "linear", la.CONFIGS, "fwd", blocks, call, grads)
    # The summary kernel runs in both directions (φ_kᵀV forward, φ_qᵀ·do/z backward).
    keep_fastest(log, "linear", la.CONFIGS, "summary", summary, lambda: call().backward(do), grads)
    for name in ("bwd_query", "bwd_key"):
        keep_fastest(log, "linear", la.CONFIGS, name, blocks, lambda: call().backward(do), grads)


# The rows' inputs live in these functions, so each row's tensors are freed before the next is made.
def time_dense(add):
    S = GRID.tokens
    q, k, v = (torch.randn(1, HEADS, S, HEAD_DIM, device="cuda", dtype=DTYPE, requires_grad=True) for _ in range(3))

    def dense():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)

    return add("SDPA cuDNN (dense)", dense, [q, k, v], 4.0 * HEADS * S * S * HEAD_DIM)


def time_feature_map(add):
    feature_map, x, grads = feature_map_inputs()
    add("feature map φ, reference (FeatureMap.forward)", lambda: feature_map(x), grads)
    add("feature map φ, fused kernel (forward_kernel)", lambda: feature_map.forward_kernel(x), grads)


def time_hybrid_op(add, rate, flops):
    inputs = op_inputs(rate)
    add(f"hybrid op R={rate} (given φ_q, KV)", lambda: hy.hybrid_attention(*inputs, rate), inputs, flops)
    with deterministic():
        add(f"hybrid op R={rate}, deterministic backward", lambda: hy.hybrid_attention(*inputs, rate), inputs, flops)


def variant_call(cls, config):
    processor = cls(config, heads=HEADS, head_dim=HEAD_DIM, dim=HEADS * HEAD_DIM).to("cuda", DTYPE)
    S = GRID.tokens
    q, k, v = (torch.randn(1, S, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, requires_grad=True) for _ in range(3))
    return lambda: processor.attend_kernel(q, k, v, GRID), [q, k, v, *processor.parameters()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="time launch configs first and keep the fastest")
    parser.add_argument("--json", help="write all rows here")
    args = parser.parse_args()
    log = lambda s: print(s, flush=True)
    log(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
        f"cuDNN {torch.backends.cudnn.version()}")
    if args.sweep:
        sweep(log)
    log(f"configs: hybrid {hy.CONFIGS}, feature map {fm.CONFIGS}, linear {la.CONFIGS}")
    S = GRID.tokens
    rows = []

    def add(name, call, grads, flops=None):
        with torch.no_grad():  # the forward as inference runs it; the backward's own forward is in fwd+bwd
            row = dict(name=name, fwd_ms=bench(call))
        grad = torch.randn_like(call())
        row["fwd_bwd_ms"] = bench(lambda: call().backward(grad), grad_to_none=grads)
        for t in grads:  # the peak counts the gradients made, not ones left from timing
            t.grad = None
        row["peak_gib"] = peak_gib(lambda: call().backward(grad))
        if flops:
            row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
            row["fwd_bwd_tflops"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e9
        rows.append(row)
        log(f"{name}: fwd {row['fwd_ms']:.3f} ms, fwd+bwd {row['fwd_bwd_ms']:.3f} ms, peak {row['peak_gib']:.2f} GiB"
            + (f" ({row['fwd_tflops']:.0f} / {row['fwd_bwd_tflops']:.0f} TFLOP/s)" if flops else ""))
        return row

    cudnn = time_dense(add)
    time_feature_map(add)
    add("linear op alone (linear_attention)", *linear_op_call())
    linear = add("linear variant (attend_kernel)", *variant_call(LinearAttention, LinearConfig()))
    for rate in (4, 8):
        softmax_flops = 4.0 * HEADS * S * -(-S // rate) * HEAD_DIM
        time_hybrid_op(add, rate, softmax_flops)
        hybrid = variant_call(HybridAttention, HybridConfig(rate=rate))
        add(f"hybrid variant R={rate} (attend_kernel)", *hybrid, flops=softmax_flops)
        with deterministic():
            add(f"hybrid variant R={rate}, deterministic backward", *hybrid, flops=softmax_flops)
        rows.append(dict(name=f"yardstick R={rate}: cuDNN / R + linear",
                         fwd_ms=cudnn["fwd_ms"] / rate + linear["fwd_ms"],
                         fwd_bwd_ms=cudnn["fwd_bwd_ms"] / rate + linear["fwd_bwd_ms"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(configs=hy.CONFIGS, feature_map_configs=fm.CONFIGS, linear_configs=la.CONFIGS, rows=rows),
                      f, indent=1)
    lines = ["| what | fwd ms | fwd+bwd ms | TFLOP/s fwd / fwd+bwd | × cuDNN fwd / fwd+bwd | fwd+bwd peak GiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        tflops = f"{r['fwd_tflops']:.0f} / {r['fwd_bwd_tflops']:.0f}" if "fwd_tflops" in r else ""
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else ""
        lines.append(f"| {r['name']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {tflops} | "
                     f"{cudnn['fwd_ms'] / r['fwd_ms']:.2f} / {cudnn['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f} | {peak} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
