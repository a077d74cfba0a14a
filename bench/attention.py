"""Time block-sparse attention against dense SDPA and the peer VSA kernels, in one run on one GPU.

    python3 bench/attention.py [--sweep] [--shapes 1.3b 720p] [--json out.json]

Rows at each shape (batch 1, 12 heads × 128, bf16, 4×4×4 tiles): SDPA cuDNN and flash (dense), ours,
fastvideo-kernel's block-sparse op (Triton path) and vsa's Triton op, forward and forward+backward,
at 87.5% and 75% of key tiles skipped. The selection is random top-k per query tile, the same for
everyone. Ours runs on unpadded tile-ordered tokens; the peers on tiles zero-padded to 64 tokens.
TFLOP/s count 4·64·64·D per listed tile pair (fwd+bwd: 3.5× that), dense counts 4·S²·D: the peers' padded
work. Ours skips part of the padding (half-width steps for tiles of ≤ 32 tokens), so compare times; the
log prints the share of real token pairs in the listed tile pairs.
Also: our token permutation (raster → tile order and back), chunked blocks (whole frames), peak memory.
`--sweep` first times launch configs of each of our kernels and keeps the fastest.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import types

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.memory import peak_gib  # noqa: E402
from bench.sweep import keep_fastest  # noqa: E402
from surgery.grid import VideoGrid, block_layout  # noqa: E402
from surgery.kernels import block_sparse as bs  # noqa: E402
from surgery.kernels.tile_order import tile_permutation, to_tile_order  # noqa: E402

SHAPES = {"1.3b": VideoGrid(21, 30, 52), "720p": VideoGrid(21, 45, 80)}
HEADS, HEAD_DIM, TILE = 12, 128, (4, 4, 4)
DTYPE = torch.bfloat16


def bench(fn, grad_to_none=None, rep=300):
    return do_bench(fn, warmup=50, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def load_peers():
    peers = {}
    os.environ["FASTVIDEO_VSA_TRITON"] = "1"
    try:
        from fastvideo_kernel import block_sparse_attn_from_indices

        peers["fastvideo-kernel"] = lambda q, k, v, idx, cnt, block_map, sizes: block_sparse_attn_from_indices(
            q, k, v, idx, cnt, sizes)[0]
    except Exception as e:  # a peer that does not load is reported, not fatal
        print(f"fastvideo-kernel unavailable: {e!r}")
    try:
        # vsa's package __init__ imports its compiled extension, built for another torch: skip it.
        spec = importlib.util.find_spec("vsa")
        pkg = types.ModuleType("vsa")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["vsa"] = pkg
        from vsa.block_sparse_wrapper import block_sparse_attn_triton

        peers["vsa"] = lambda q, k, v, idx, cnt, block_map, sizes: block_sparse_attn_triton(
            q, k, v, block_map, sizes)[0]
    except Exception as e:
        print(f"vsa unavailable: {e!r}")
    return peers


def selection(batch, n, top_k, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    idx = torch.rand(batch, HEADS, n, n, device="cuda", generator=g).topk(top_k, dim=-1).indices
    idx = idx.sort(dim=-1).values.int()  # [B, H, n, k]
    cnt = torch.full((batch, HEADS, n), top_k, dtype=torch.int32, device="cuda")
    block_map = torch.zeros(batch, HEADS, n, n, dtype=torch.bool, device="cuda").scatter_(-1, idx.long(), True)
    return idx, cnt, block_map


def ours(q, k, v, idx, cnt, layout):
    return bs.block_sparse_attention(q, k, v, idx, cnt, layout.offsets, layout.offsets)[0]


def chunked_case(grid, q, k, v, q_tile=64):
    """Chunked blocks: key blocks of 3 whole frames (longer than 128 tokens: the chunked path), query tiles
    of `q_tile` each visiting 3 of them at random. Returns (closure, FLOPs of its computed chunks, label)."""
    S = grid.tokens
    frames = block_layout(grid, (3, grid.height, grid.width), "cuda")
    n_kv = frames.num_blocks
    q_offsets = torch.tensor([*range(0, S, q_tile), S], device="cuda")
    n_q = q_offsets.numel() - 1
    gsel = torch.Generator(device="cuda").manual_seed(2)
    idx = torch.rand(1, HEADS, n_q, n_kv, device="cuda", generator=gsel).topk(3, dim=-1).indices.sort(-1).values.int()
    cnt = torch.full((1, HEADS, n_q), 3, dtype=torch.int32, device="cuda")
    block = int(frames.sizes.max())
    flops = 4.0 * HEADS * n_q * 3 * math.ceil(block / 64) * q_tile * 64 * HEAD_DIM

    def call():
        return bs.block_sparse_attention(q, k, v, idx, cnt, q_offsets, frames.offsets, q_tile, block)[0]

    return call, flops, f"{q_tile}-query tiles, 3 of {n_kv} blocks of {block} keys"


def sweep(grid, log):
    """Time each launch config of each kernel at `grid`, 87.5% skipped; keep the fastest in bs.CONFIGS."""
    layout = block_layout(grid, TILE, "cuda")
    n, S = layout.num_blocks, layout.order.numel()
    idx, cnt, _ = selection(1, n, math.ceil(0.125 * n), seed=0)
    q, k, v, do = (torch.randn(1, S, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE) for _ in range(4))
    args = (idx, cnt, layout.offsets, layout.offsets, 64, 64, HEAD_DIM ** -0.5)
    o, lse, _, _ = bs.block_sparse_attn_fwd(q, k, v, *args)
    # 8 warps lost everywhere in earlier sweeps (bench/NOTES.md); one is kept as a check.
    configs = [dict(num_warps=4, num_stages=s) for s in (2, 3, 4)] + [dict(num_warps=8, num_stages=3)]
    calls = {"fwd": lambda: bs.block_sparse_attn_fwd(q, k, v, *args),
             "dq": lambda: bs.block_sparse_attn_bwd(do, q, k, v, o, lse, *args)}
    for name in ("fwd", "dq", "dkv"):
        keep_fastest(log, "block-sparse", bs.CONFIGS, name, configs, calls.get(name, calls["dq"]))
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    call, _, what = chunked_case(grid, qg, kg, vg)
    candidates = [dict(BLOCK_N=bn, num_warps=warps, num_stages=stages)
                  for bn, warps, stages in [(64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 8, 3)]]
    keep_fastest(log, f"block-sparse fwd+bwd ({what})", bs.CONFIGS, "chunked", candidates,
                 lambda: call().backward(do), [qg, kg, vg])


def run_shape(label, grid, peers, rows, log, ours_only=False):
    layout = block_layout(grid, TILE, "cuda")
    n, S = layout.num_blocks, grid.tokens
    S_pad = n * 64
    dense_flops = 4.0 * HEADS * S * S * HEAD_DIM
    mk = lambda s: torch.randn(1, s, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, requires_grad=True)
    q, k, v = mk(S), mk(S), mk(S)  # ours: [B, S, H, D], tile order, unpadded
    # Peers: [B, H, S_pad, D], every tile padded to 64 tokens.
    qp, kp, vp = (mk(S_pad).detach().transpose(1, 2).contiguous().requires_grad_() for _ in range(3))
    sizes = layout.sizes.int()
    g = torch.randn_like(q)
    gp = torch.randn_like(qp)

    def add(name, fwd, fwd_bwd, flops, params, grads, grad):
        row = dict(shape=label, name=name)
        row["fwd_ms"] = bench(fwd)
        row["fwd_bwd_ms"] = bench(lambda: fwd_bwd().backward(grad), grad_to_none=grads)
        row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
        row["fwd_bwd_tflops"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e9
        row["fwd_peak_gib"] = peak_gib(lambda: fwd())
        row["fwd_bwd_peak_gib"] = peak_gib(lambda: fwd_bwd().backward(grad))
        for t in grads:
            t.grad = None
        row.update(params)
        rows.append(row)
        log(f"{label} {name}: fwd {row['fwd_ms']:.3f} ms ({row['fwd_tflops']:.0f} TFLOP/s), fwd+bwd "
            f"{row['fwd_bwd_ms']:.3f} ms ({row['fwd_bwd_tflops']:.0f}), peak {row['fwd_peak_gib']:.2f}/"
            f"{row['fwd_bwd_peak_gib']:.2f} GiB")

    dense_backends = () if ours_only else ((SDPBackend.CUDNN_ATTENTION, "SDPA cuDNN (dense)"),
                                           (SDPBackend.FLASH_ATTENTION, "SDPA flash (dense)"))
    for backend, name in dense_backends:
        def dense(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        add(name, dense, dense, dense_flops, {}, [q, k, v], g.transpose(1, 2))

    for sparsity in (0.875, 0.75):
        top_k = math.ceil((1 - sparsity) * n)
        idx, cnt, block_map = selection(1, n, top_k, seed=1)
        flops = 4.0 * HEADS * n * top_k * 64 * 64 * HEAD_DIM
        params = dict(sparsity=sparsity, top_k=top_k)
        add(f"ours {sparsity:.1%} skipped", lambda: ours(q, k, v, idx, cnt, layout),
            lambda: ours(q, k, v, idx, cnt, layout), flops, params, [q, k, v], g)
        if ours_only:
            continue
        if sparsity == 0.875:
            # The same kernel on [B, H, S, D] tensors (passed as transposed views): does the layout matter?
            qh, kh, vh = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
            add(f"ours {sparsity:.1%} skipped, [B,H,S,D] input", lambda: ours(qh, kh, vh, idx, cnt, layout),
                lambda: ours(qh, kh, vh, idx, cnt, layout), flops, params, [qh, kh, vh], g)
            log(f"{label} host-side list preparation (in our backward): invert_block_index "
                f"{bench(lambda: bs.invert_block_index(idx, cnt, layout.offsets, n, 32)):.3f} ms, listed_ranges "
                f"{bench(lambda: bs.listed_ranges(idx, cnt, layout.offsets, 32)):.3f} ms")
        sizes_f = layout.sizes.double()
        real = (sizes_f.view(-1, 1) * sizes_f[idx.long()]).sum().item() / (HEADS * n * top_k * 64 * 64)
        log(f"{label} {sparsity:.1%}: the listed tile pairs hold {real:.3f} of 64×64 token pairs each (partial tiles)")
        for peer, fn in peers.items():
            call = lambda fn=fn: fn(qp, kp, vp, idx, cnt, block_map, sizes)
            try:
                add(f"{peer} {sparsity:.1%} skipped", call, call, flops, params, [qp, kp, vp], gp)
            except Exception as e:
                log(f"{label} {peer} failed: {e!r}")

    if ours_only:
        return
    # Raster → tile order for q, k, v and back for the output, as a layer runs it; and its backward.
    order, inverse = tile_permutation(grid, TILE, torch.device("cuda"))
    x = q.detach()
    perm = dict(shape=label, name="permutation")
    perm["gather_ms"] = bench(lambda: to_tile_order(x, order, inverse))
    perm["copy_ms"] = bench(lambda: x.clone())
    perm["layer_fwd_ms"] = 4 * perm["gather_ms"]
    perm["gbps"] = 2 * x.numel() * x.element_size() / perm["gather_ms"] / 1e6
    rows.append(perm)
    log(f"{label} permutation: one [B,S,H,D] gather {perm['gather_ms']:.3f} ms ({perm['gbps']:.0f} GB/s; "
        f"clone {perm['copy_ms']:.3f} ms); per layer 4 gathers fwd, 4 bwd")

    for q_tile in (64, 128):
        chunked, flops, what = chunked_case(grid, q, k, v, q_tile)
        add(f"ours chunked: {what}", chunked, chunked, flops, {}, [q, k, v], g)
    if label == "1.3b":
        profile(lambda: ours(q, k, v, idx, cnt, layout).backward(g), [q, k, v], "ours 75% skipped", log)
        for peer, fn in peers.items():  # where the peers' backward time goes, kernel by kernel
            profile(lambda fn=fn: fn(qp, kp, vp, idx, cnt, block_map, sizes).backward(gp), [qp, kp, vp],
                    f"{peer} 75% skipped", log)
        profile(lambda: chunked_case(grid, q, k, v)[0]().backward(g), [q, k, v], "ours chunked", log)


def profile(fn, leaves, what, log):
    """Per-kernel device time of one call of `fn` (after a warm-up), from the PyTorch profiler; the gradients
    of `leaves` are cleared before each call, so no accumulation kernels show."""
    def call():
        for t in leaves:
            t.grad = None
        fn()

    call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    log(f"profile of {what} fwd+bwd:")
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
        log(f"  {e.device_time_total / 1e3:8.3f} ms  {e.count:3d}×  {e.key[:90]}")


def table(rows):
    lines = []
    for label in dict.fromkeys(r["shape"] for r in rows):
        shape_rows = [r for r in rows if r["shape"] == label]
        dense = next((r for r in shape_rows if r["name"].startswith("SDPA cuDNN")), None)
        speedup = (lambda r: f"{dense['fwd_ms'] / r['fwd_ms']:.2f} / {dense['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}"
                   if dense else "–")
        lines += [f"\n{label}: {SHAPES[label]} tokens={SHAPES[label].tokens}",
                  "| what | fwd ms | fwd+bwd ms | TFLOP/s fwd / fwd+bwd | × cuDNN fwd / fwd+bwd | peak GiB fwd / fwd+bwd |",
                  "|---|---|---|---|---|---|"]
        for r in shape_rows:
            if r["name"] == "permutation":
                lines.append(f"| permutation: one [B,S,H,D] gather ({r['gbps']:.0f} GB/s); clone {r['copy_ms']:.3f} | "
                             f"{r['gather_ms']:.3f} | | | | |")
                continue
            lines.append(
                f"| {r['name']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
                f"{r['fwd_tflops']:.0f} / {r['fwd_bwd_tflops']:.0f} | "
                f"{speedup(r)} | "
                f"{r['fwd_peak_gib']:.2f} / {r['fwd_bwd_peak_gib']:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--sweep", action="store_true", help="time launch configs first and keep the fastest")
    parser.add_argument("--json", help="write all rows here")
    parser.add_argument("--ours-only", action="store_true", help="only our kernel's top-k rows")
    args = parser.parse_args()
    log = lambda s: print(s, flush=True)
    log(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
        f"cuDNN {torch.backends.cudnn.version()}")
    if args.sweep:
        sweep(SHAPES["1.3b"], log)
    log(f"configs: {bs.CONFIGS}")
    peers = {} if args.ours_only else load_peers()
    rows = []
    for label in args.shapes:
        run_shape(label, SHAPES[label], peers, rows, log, args.ours_only)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(configs=bs.CONFIGS, rows=rows), f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
