import torch
from triton.testing import do_bench
from surgery.grid import VideoGrid
from surgery.variants.vmoba import VMoBAConfig, VideoMixtureOfBlockAttention

grid = VideoGrid(21, 30, 52)
S, H, D = grid.tokens, 12, 128
q, k = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for layer in (0, 1, 2):
    m = VideoMixtureOfBlockAttention(VMoBAConfig(select="threshold", threshold=0.25), heads=H, head_dim=D, dim=H * D,
                                     layer_index=layer)
    a, layout = m.choose_blocks(q.float(), k.float(), grid)
    b, _ = m.choose_blocks(q.float(), k.float(), grid, searched=True)
    t = {s: do_bench(lambda: m.choose_blocks(q.float(), k.float(), grid, searched=s), warmup=20, rep=200,
                     return_mode="median") for s in (False, True, False, True)}
    print(f"layer {layer} ({m.partition}, {layout.num_blocks} blocks): same mask {torch.equal(a, b)}, kept {a.float().mean():.4f}; "
          f"choose_blocks sort {t[False]:.3f} ms, search {t[True]:.3f} ms", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        m.choose_blocks(q.float(), k.float(), grid, searched=True); torch.cuda.synchronize()
    ev = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    print("   device total", round(sum(e.device_time_total for e in ev) / 1e3, 3), "ms;",
          "; ".join(f"{e.key[:40]} {e.device_time_total / 1e3:.3f}x{e.count}" for e in ev[:7]))
