"""Where a variant's kernel path spends its time: a torch.profiler table of CUDA kernels for one
forward+backward of `attend_kernel` at the Wan-1.3B shape (batch 1, 12 heads × 128, bf16).

    python3 bench/profile_variant.py [--variant vsa] [--params '{"sparsity": 0.875}'] [--layer 0] [--rows 15]

`--layer` picks the layer index (VMoBA cycles 1D, 2D, 3D blocks by it); `--forward` profiles the inference
forward alone (under no_grad).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from surgery.grid import VideoGrid
from surgery.variants import VARIANTS

GRID, HEADS, HEAD_DIM = VideoGrid(21, 30, 52), 12, 128


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="vsa", choices=sorted(VARIANTS))
    parser.add_argument("--params", default='{"sparsity": 0.875}', help="the variant's config, as JSON")
    parser.add_argument("--layer", type=int, default=0, help="the layer's index (VMoBA: 0 1D, 1 2D, 2 3D)")
    parser.add_argument("--forward", action="store_true", help="the forward alone, under no_grad")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    cls = VARIANTS[args.variant]
    dim = HEADS * HEAD_DIM
    variant = cls(cls.Config(**json.loads(args.params)), heads=HEADS, head_dim=HEAD_DIM, dim=dim,
                  layer_index=args.layer).cuda().bfloat16()
    make = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = (make(1, GRID.tokens, HEADS, HEAD_DIM) for _ in range(3))
    x = make(1, GRID.tokens, dim)
    upstream = torch.randn_like(q)
    leaves = [q, k, v, x, *variant.parameters()]

    def step():
        if args.forward:
            with torch.no_grad():
                variant.attend_kernel(q, k, v, GRID, x)
            return
        for t in leaves:  # a fresh gradient each step, as in training: no accumulation kernels in the profile
            t.grad = None
        variant.attend_kernel(q, k, v, GRID, x).backward(upstream)
    for _ in range(3):  # compile and warm up
        step()
    torch.cuda.synchronize()
    # Wall clock too: host syncs and launch gaps show as wall time the kernel table does not hold.
    start = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / 5 * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    what = "forward" if args.forward else "forward+backward"
    print(f"{args.variant} {args.params}, layer {args.layer}, grid {GRID}: wall {wall_ms:.2f} ms per {what}; "
          "CUDA time below (5 runs)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
