"""Peak GPU memory of one call, shared by the bench scripts."""

import torch


def peak_gib(fn) -> float:
    """Peak memory allocated while `fn` runs, above what was allocated before it (GiB)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30
