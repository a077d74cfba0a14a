"""Launch-config sweeps, shared by the bench scripts."""

from triton.testing import do_bench


def keep_fastest(log, op, configs, name, candidates, call, grads=None):
    """Time `call` under each launch config in `candidates` for `op`'s kernel `name` (`configs[name]`, the
    module's CONFIGS entry); keep the fastest there. A config that fails (e.g. out of shared memory) is skipped."""
    results = []
    for config in candidates:
        configs[name] = config
        try:
            ms = do_bench(call, warmup=25, rep=100, grad_to_none=grads, return_mode="median")
        except Exception as e:
            ms = float("inf")
            log(f"  {op} {name} {config}: {type(e).__name__}")
        results.append((ms, config))
        log(f"  sweep {op} {name} {config}: {ms:.3f} ms")
    best_ms, best = min(results, key=lambda r: r[0])
    configs[name] = best
    log(f"best {op} {name}: {best} {best_ms:.3f} ms")
