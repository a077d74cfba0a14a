"""Time the whole `vsa`, `hybrid_selected` and `vmoba` variant paths against dense SDPA and the peers' whole VSA, in
one run on one GPU.

    python3 bench/variants.py [--shapes 1.3b 720p] [--no-vmoba | --no-vsa] [--json out.json]
    TRITON_INTERPRET=1 python3 bench/variants.py --smoke    # CPU, tiny grid: checks the code paths only

Rows take q, k, v as a Wan layer hands them to its attention: [B, S, H, D], raster order (batch 1,
12 heads × 128, bf16), plus the attention input x [B, S, H·D] where a gate needs it. Forward is timed
under `torch.no_grad` (inference); forward+backward sends a random upstream gradient into q, k, v, x and
the variant's parameters. `triton.testing.do_bench` medians; peak = most memory allocated during a call
above what was allocated before it. Rows:

- SDPA with the cuDNN backend (dense): the baseline every speedup is against.
- ours `vsa`: `VideoSparseAttention.attend_kernel` at 87.5% and 75% of tiles skipped: permutation to tile
  order with the tile means, fp32 coarse attention and top-k, the block-sparse fine stage, the gate
  projection, and the gated sum written back in raster order. Target: faster than the best fastvideo-kernel row at the same sparsity.
- ours `hybrid_selected`: `HybridSelectedAttention.attend_kernel` at the same sparsities as `vsa` (F = head_dim):
  the same permutation, tile means and fp32 top-k, φ_q and φ_k, the per-tile summaries and the complement (one
  product with the selection matrix), and the block-sparse op with the linear term under the shared normaliser.
  Target: within 1.15× of ours `vsa` at the same sparsity, forward and forward+backward.
- the peers' whole VSA (`video_sparse_attn` of fastvideo-kernel, once per backend that loads, and of
  vsa), same sparsity and top-k, in two forms: (1) wrapped as FastVideo's VSA layer wraps it (same gate
  projection; q, k, v, gate stacked and scattered into zero-padded 64-token tiles, [B, H, S_pad, D] copies,
  the op, one gather back to raster order); (2) the op alone on already tiled and padded [B, H, S_pad, D]
  inputs with the gate values given, the form of the peers' published figures (no permutation, no projection).
- ours `vmoba`: `VideoMixtureOfBlockAttention.attend_kernel`, global threshold τ = 0.25, at layers 0, 1, 2
  (1D, 2D, 3D blocks). Target: time ≤ density × cuDNN dense time / 0.8, with the density the variant
  measured (query-key pairs attended / S²), printed next to the share the path computes. On CUDA, one row
  per path: cuDNN (`selected_blocks.PaddedProblems`) and the Triton kernels, each forced; "(default)" marks
  the one `selected_blocks` picks. Random q, k give
  near-uniform block scores, so those densities are not a trained layer's.
  `--sweep` first times launch configs of the vmoba kernels (`kernels/selected_blocks.py`) at layer 0.

No row forms a [tokens × tokens] tensor; the header prints the size of one, next to the peaks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
import types
from typing import Callable

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.memory import peak_gib  # noqa: E402
from bench.sweep import keep_fastest  # noqa: E402
from surgery.grid import VideoGrid, block_layout  # noqa: E402
from surgery.kernels import selected_blocks  # noqa: E402
from surgery.kernels.tile_order import tile_permutation  # noqa: E402
from surgery.variants.hybrid_selected import HybridSelectedAttention, HybridSelectedConfig  # noqa: E402
from surgery.variants.vmoba import VideoMixtureOfBlockAttention, VMoBAConfig  # noqa: E402
from surgery.variants.vsa import VideoSparseAttention, VSAConfig  # noqa: E402

SHAPES = {"1.3b": VideoGrid(21, 30, 52), "720p": VideoGrid(21, 45, 80)}
SMOKE_GRID = VideoGrid(4, 6, 10)  # partial 4×4×4 tiles and partial VMoBA blocks
TILE = (4, 4, 4)  # VSA's tile, ours and the peers'
SPARSITIES = (0.875, 0.75)
VMOBA_THRESHOLD = 0.25
VMOBA_LAYERS = (0, 1, 2)  # layer % 3 picks 1D, 2D, 3D blocks
VMOBA_MARGIN = 0.8  # the target: density × dense time / 0.8
HYBRID_SELECTED_MARGIN = 1.15  # the target: within 1.15× of ours vsa at the same sparsity


@dataclasses.dataclass(frozen=True)
class Setup:
    device: torch.device
    dtype: torch.dtype
    heads: int
    head_dim: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


GPU = Setup(torch.device("cuda"), torch.bfloat16, 12, 128)
SMOKE = Setup(torch.device("cpu"), torch.float32, 2, 32)


# ---- measuring ----------------------------------------------------------------------------------
def time_ms(fn, grads, cuda: bool) -> float:
    if cuda:
        return do_bench(fn, warmup=50, rep=500, grad_to_none=grads, return_mode="median")
    times = []  # CPU smoke: wall clock of a few calls, only to run the same code
    for _ in range(2):
        for t in grads:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def peak_gib_or_none(fn, cuda: bool) -> float | None:
    """`memory.peak_gib` on the GPU; on CPU (smoke runs) just run `fn` and return None."""
    if not cuda:
        fn()
        return None
    return peak_gib(fn)


def measure(rows, log, shape, family, name, forward, grads, upstream, cuda, peer=False, **info):
    """Time `forward()` alone (no autograd) and with a backward of `upstream` into `grads`; append the row.
    A peer that fails gets a row saying why; ours fails loudly."""
    row = dict(shape=shape, family=family, name=name, **info)

    def fwd():
        with torch.no_grad():
            forward()

    def fwd_bwd():
        forward().backward(upstream)

    def clear():
        for t in grads:
            t.grad = None

    try:
        row["fwd_ms"] = time_ms(fwd, [], cuda)
        row["fwd_bwd_ms"] = time_ms(fwd_bwd, grads, cuda)
        clear()
        row["fwd_peak_gib"] = peak_gib_or_none(fwd, cuda)
        row["fwd_bwd_peak_gib"] = peak_gib_or_none(fwd_bwd, cuda)
    except Exception as e:
        if not peer:
            raise
        row["missing"] = f"failed: {short(e)}"
    clear()
    rows.append(row)
    if "missing" in row:
        log(f"{shape} {name}: {row['missing']}")
    else:
        log(f"{shape} {name}: fwd {row['fwd_ms']:.3f} ms, fwd+bwd {row['fwd_bwd_ms']:.3f} ms, "
            f"peak {gib(row['fwd_peak_gib'])} / {gib(row['fwd_bwd_peak_gib'])} GiB")
    return row


def short(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


def gib(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


# ---- the peers ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Peer:
    """A peer's whole-VSA op: call(q, k, v, tile_sizes, top_k, gate) on zero-padded [B, H, S_pad, D] tiles
    → [B, H, S_pad, D]; None with `missing` saying why where it does not load. `note`: how it was loaded."""

    family: str
    name: str
    call: Callable | None
    missing: str = ""
    note: str = ""


@contextlib.contextmanager
def environment(values: dict[str, str]):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def load_peers() -> list[Peer]:
    return load_fastvideo_kernel() + [load_vsa_package()]


def load_fastvideo_kernel() -> list[Peer]:
    """fastvideo-kernel's `video_sparse_attn`, once per backend: Triton (forced with FASTVIDEO_VSA_TRITON=1)
    and ThunderKittens (its compiled sm_90 extension, when that loads against this torch)."""
    try:
        from fastvideo_kernel import __version__, video_sparse_attn
    except Exception as e:  # a peer that does not load is reported, not fatal
        return [Peer("fastvideo-kernel", "fastvideo-kernel", None, short(e))]
    name = f"fastvideo-kernel {__version__}"

    def backend(env):
        def call(q, k, v, sizes, top_k, gate):
            # The op reads the backend switches on every call; only the forward's choice matters.
            with environment(env):
                return video_sparse_attn(q, k, v, sizes, sizes, top_k, block_size=TILE, compress_attn_weight=gate)
        return call

    peers = [Peer("fastvideo-kernel", f"{name} Triton", backend({"FASTVIDEO_VSA_TRITON": "1"}),
                  note="forced with FASTVIDEO_VSA_TRITON=1")]
    try:
        from fastvideo_kernel._C import fastvideo_kernel_ops

        missing = "" if hasattr(fastvideo_kernel_ops, "block_sparse_fwd") else "its extension has no block_sparse_fwd"
        if torch.cuda.get_device_capability() != (9, 0):
            missing = f"built for sm_90 only, this is sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
    except Exception as e:
        missing = f"compiled extension does not load: {short(e)}"
    tk = None if missing else backend({"FASTVIDEO_VSA_TRITON": "0", "FASTVIDEO_VSA_TK": "1"})
    peers.append(Peer("fastvideo-kernel", f"{name} ThunderKittens", tk, missing))
    return peers


def load_vsa_package() -> Peer:
    """vsa's `video_sparse_attn`. On an H100 its package __init__ imports its compiled extension, which may not
    load against this torch: then import it with a stand-in extension and point the op at vsa's Triton kernel."""
    try:
        version = importlib.metadata.version("vsa")
    except importlib.metadata.PackageNotFoundError as e:
        return Peer("vsa", "vsa", None, short(e))
    try:
        import vsa

        path, note = ("Triton", "") if vsa.block_sparse_fwd is None else ("compiled sm_90", "")
    except Exception as e:
        reason = short(e)
        for module in [m for m in sys.modules if m == "vsa" or m.startswith("vsa.")]:
            del sys.modules[module]
        stand_in = types.ModuleType("vsa_cuda")
        stand_in.block_sparse_fwd = stand_in.block_sparse_bwd = None
        sys.modules["vsa_cuda"] = stand_in
        try:
            import vsa
            from vsa.block_sparse_wrapper import block_sparse_attn_triton

            vsa.block_sparse_attn = block_sparse_attn_triton  # the global its video_sparse_attn calls
        except Exception as e2:
            return Peer("vsa", f"vsa {version}", None, f"{reason}; Triton fallback: {short(e2)}")
        path, note = "Triton", f"its compiled extension does not load ({reason}): its op runs on its Triton kernel"

    def call(q, k, v, sizes, top_k, gate):
        return vsa.video_sparse_attn(q, k, v, sizes, top_k, TILE, compress_attn_weight=gate)

    return Peer("vsa", f"vsa {version} {path}", call, note=note)


@dataclasses.dataclass(frozen=True)
class PaddedTiles:
    """The peers' layout: every 4×4×4 tile padded to 64 tokens; equal to fastvideo_kernel.build_vsa_metadata's
    tile_partition_indices, non_pad_index, non_pad_index[reverse_tile_partition_indices], variable_block_sizes."""

    order: torch.Tensor  # [S] raster token at each tile-order position
    non_pad: torch.Tensor  # [S] padded position of each tile-order position
    untile: torch.Tensor  # [S] padded position of each raster token
    sizes: torch.Tensor  # [n] int32 real tokens per tile
    padded_tokens: int


def padded_tiles(grid: VideoGrid, device) -> PaddedTiles:
    layout = block_layout(grid, TILE, device)
    order, inverse = tile_permutation(grid, TILE, device)
    n, block = layout.num_blocks, math.prod(TILE)
    tile_of_position = torch.repeat_interleave(torch.arange(n, device=device), layout.sizes)
    non_pad = tile_of_position * block + torch.arange(grid.tokens, device=device) - layout.offsets[tile_of_position]
    return PaddedTiles(order, non_pad, non_pad[inverse], layout.sizes.int(), n * block)


def fastvideo_layer(peer: Peer, tiles: PaddedTiles, top_k: int, gate_projection, heads: int):
    """The peer's op as FastVideo's VSA layer calls it (fastvideo/attention/layer.py DistributedAttention_VSA
    and backends/video_sparse_attn.py, no sequence parallelism): raster [B, S, H, D] in and out. A fresh
    zero buffer per call, as its training path does (inference reuses one)."""

    def call(q, k, v, x):
        gate = gate_projection(x).unflatten(-1, (heads, -1))
        qkvg = torch.cat([q, k, v, gate])
        tiled = qkvg.new_zeros(qkvg.shape[0], tiles.padded_tokens, *qkvg.shape[2:])
        tiled[:, tiles.non_pad] = qkvg[:, tiles.order]
        q, k, v, gate = (t.transpose(1, 2).contiguous() for t in tiled.chunk(4))
        return peer.call(q, k, v, tiles.sizes, top_k, gate).transpose(1, 2)[:, tiles.untile]

    return call


# ---- one shape ----------------------------------------------------------------------------------
def dense_attention(q, k, v, cuda: bool):
    bhsd = [t.transpose(1, 2) for t in (q, k, v)]
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]) if cuda else contextlib.nullcontext():
        return F.scaled_dot_product_attention(*bhsd).transpose(1, 2)


def run_shape(label: str, grid: VideoGrid, setup: Setup, peers: list[Peer], log, vmoba_layers=VMOBA_LAYERS,
              skip_vsa=False) -> list[dict]:
    S, H, D = grid.tokens, setup.heads, setup.head_dim
    cuda, dim = setup.cuda, H * D
    make = lambda *shape: torch.randn(*shape, device=setup.device, dtype=setup.dtype, requires_grad=True)
    q, k, v, x = make(1, S, H, D), make(1, S, H, D), make(1, S, H, D), make(1, S, dim)
    upstream = torch.randn(1, S, H, D, device=setup.device, dtype=setup.dtype)
    rows = []
    dense_name = "SDPA cuDNN (dense)" if cuda else "SDPA (dense; CPU: default backend)"
    measure(rows, log, label, "dense", dense_name, lambda: dense_attention(q, k, v, cuda), [q, k, v], upstream, cuda)

    tiles = padded_tiles(grid, setup.device) if peers else None
    n = block_layout(grid, TILE).num_blocks
    for sparsity in () if skip_vsa else SPARSITIES:
        vsa = VideoSparseAttention(VSAConfig(tile=TILE, sparsity=sparsity), heads=H, head_dim=D, dim=dim)
        vsa = vsa.to(setup.device, setup.dtype)
        top_k = vsa.config.tiles_kept(n)
        info = dict(sparsity=sparsity, top_k=top_k, tiles=n)
        what = f"{sparsity:.1%} of tiles skipped (top-{top_k} of {n})"
        params = list(vsa.parameters())
        measure(rows, log, label, "ours-vsa", f"ours vsa attend_kernel, {what}",
                lambda: vsa.attend_kernel(q, k, v, grid, x), [q, k, v, x, *params], upstream, cuda, **info)
        hybrid = HybridSelectedAttention(HybridSelectedConfig(tile=TILE, sparsity=sparsity), heads=H, head_dim=D,
                                         dim=dim).to(setup.device, setup.dtype)
        measure(rows, log, label, "ours-hybrid-selected", f"ours hybrid_selected attend_kernel, {what}",
                lambda: hybrid.attend_kernel(q, k, v, grid), [q, k, v, *hybrid.parameters()], upstream, cuda, **info)
        if not peers:
            continue
        # Pre-tiled inputs for the op-alone rows: the same tokens, zero-padded tiles, [B, H, S_pad, D] leaves.
        gate = vsa.gate_compress(x).unflatten(-1, (H, -1))
        pretiled = [fastvideo_pad(t, tiles).transpose(1, 2).contiguous().detach().requires_grad_()
                    for t in (q, k, v, gate)]
        upstream_padded = fastvideo_pad(upstream, tiles).transpose(1, 2).contiguous()
        for peer in peers:
            if peer.call is None:
                rows.append(dict(shape=label, family=peer.family, name=peer.name,
                                 missing=f"not available: {peer.missing}", **info))
                log(f"{label} {peer.name}: not available: {peer.missing}")
                continue
            layer = fastvideo_layer(peer, tiles, top_k, vsa.gate_compress, H)
            measure(rows, log, label, peer.family, f"{peer.name}, {what}, as FastVideo's layer calls it",
                    lambda: layer(q, k, v, x), [q, k, v, x, *params], upstream, cuda, peer=True, **info)
            measure(rows, log, label, peer.family, f"{peer.name}, {what}, op alone on pre-tiled padded input",
                    lambda: peer.call(*pretiled[:3], tiles.sizes, top_k, pretiled[3]), pretiled, upstream_padded,
                    cuda, peer=True, **info)

    for layer_index in vmoba_layers:
        vmoba = VideoMixtureOfBlockAttention(VMoBAConfig(select="threshold", threshold=VMOBA_THRESHOLD),
                                             heads=H, head_dim=D, dim=dim, layer_index=layer_index)
        partition = vmoba.partition
        blocks = block_layout(grid, vmoba.config.block_shape(partition, grid)).num_blocks
        fill, default_padded, padded_density, chunked_density = computed_densities(vmoba, q, k, grid)
        for padded in (True, False) if cuda else (False,):
            path = f"cuDNN, padded fill {fill:.2f}" if padded else "Triton kernels"
            path += " (default)" if cuda and padded == default_padded else ""
            with forced_path(padded):
                row = measure(rows, log, label, "ours-vmoba",
                              f"ours vmoba attend_kernel, layer {layer_index}: {partition.upper()}, {blocks} blocks, "
                              f"τ = {VMOBA_THRESHOLD}, {path}", lambda: vmoba.attend_kernel(q, k, v, grid), [q, k, v],
                              upstream, cuda, layer=layer_index, partition=partition, blocks=blocks)
            row["density"] = vmoba.last_density  # every call sees the same q, k: the same selection
            row["computed_density"] = padded_density if padded else chunked_density
    judge(rows)
    return rows


@contextlib.contextmanager
def forced_path(padded: bool):
    """The cuDNN path (`selected_blocks.PaddedProblems`) wherever cuDNN applies, or the Triton kernels, inside."""
    before = selected_blocks.MIN_PADDED_FILL, selected_blocks.MIN_PADDED_KEYS
    selected_blocks.MIN_PADDED_FILL, selected_blocks.MIN_PADDED_KEYS = (0.0, 0) if padded else (math.inf, 0)
    try:
        yield
    finally:
        selected_blocks.MIN_PADDED_FILL, selected_blocks.MIN_PADDED_KEYS = before


def computed_densities(vmoba: VideoMixtureOfBlockAttention, q, k, grid: VideoGrid) -> tuple[float, bool, float, float]:
    """The cuDNN path's padded fill; whether `selected_blocks` takes that path by default on CUDA; the share of
    query-key pairs each path computes: padded problems (each block's chooser list padded to the longest among
    blocks of its size) or the Triton kernels' chunks (each list rounded up to whole chunks of
    `selected_blocks.CHUNK`). The target counts only the pairs selected."""
    block_mask, layout = vmoba.choose_blocks(q.float(), k.float(), grid, searched=True)
    batch, heads, tokens, _ = block_mask.shape
    square = batch * heads * tokens * tokens
    pairs = selected_blocks.list_pairs(block_mask, layout.offsets, selected_blocks.CHUNK)
    problems = selected_blocks.padded_problems(pairs, layout.offsets, batch, heads, tokens)
    padded = sum(batch * len(p.blocks) * heads * p.rows * p.key_size for p in problems.sizes)
    chunk = selected_blocks.CHUNK
    gathered = (block_mask.sum(dim=2) + chunk - 1) // chunk * chunk  # [B, H, n]
    return (selected_blocks.padded_fill(pairs, batch, heads),
            selected_blocks.padded_path_pays(pairs, int(layout.sizes.max()), batch, heads), padded / square,
            float((gathered * layout.sizes).sum(dtype=torch.float64) / square))


def sweep_vmoba(grid: VideoGrid, setup: Setup, log) -> None:
    """Time launch configs of each `selected_blocks` kernel on layer 0's selection (fwd and merge: the forward;
    dq and dkv: the backward); keep the fastest in CONFIGS."""
    S, H, D = grid.tokens, setup.heads, setup.head_dim
    q, k, v, do = (torch.randn(1, S, H, D, device=setup.device, dtype=setup.dtype) for _ in range(4))
    vmoba = VideoMixtureOfBlockAttention(VMoBAConfig(select="threshold", threshold=VMOBA_THRESHOLD),
                                         heads=H, head_dim=D, dim=H * D, layer_index=0)
    block_mask, layout = vmoba.choose_blocks(q.float(), k.float(), grid, searched=True)
    pairs = selected_blocks.list_pairs(block_mask, layout.offsets, selected_blocks.CHUNK)
    longest, scale = math.prod(layout.block), D ** -0.5
    o, dq, dk, dv = (torch.empty_like(t) for t in (q, q, k, v))
    lse = selected_blocks.selected_blocks_fwd(q, k, v, pairs, layout.offsets, scale, o)
    calls = {"fwd": lambda: selected_blocks.selected_blocks_fwd(q, k, v, pairs, layout.offsets, scale, o),
             "bwd": lambda: selected_blocks.selected_blocks_bwd(do, q, k, v, o, lse, pairs, layout.offsets, longest,
                                                                scale, dq, dk, dv)}
    candidates = {
        "fwd": [dict(BLOCK_N=n, num_warps=w, num_stages=st) for n, w, st in
                [(64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 8, 3), (64, 8, 3)]],
        "dq": [dict(BLOCK_N=n, num_warps=w, num_stages=st) for n, w, st in
               [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (32, 4, 3)]],
        "dkv": [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m, n, w, st in
                [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3)]],
        "merge": [dict(BLOCK_M=m, num_warps=w) for m, w in [(16, 4), (32, 4), (64, 4), (64, 8)]],
    }
    for name, configs in candidates.items():
        call = calls["fwd" if name in ("fwd", "merge") else "bwd"]
        keep_fastest(log, "vmoba", selected_blocks.CONFIGS, name, configs, call)


def fastvideo_pad(t: torch.Tensor, tiles: PaddedTiles) -> torch.Tensor:
    """[B, S, H, D] raster → [B, S_pad, H, D] zero-padded tiles (outside the timed calls)."""
    padded = t.new_zeros(t.shape[0], tiles.padded_tokens, *t.shape[2:])
    padded[:, tiles.non_pad] = t.detach()[:, tiles.order]
    return padded


def judge(rows: list[dict]) -> None:
    """Each target row's bound (fwd, fwd+bwd ms) and whether it is met, from rows of the same run."""
    dense, timed = rows[0], [r for r in rows if "missing" not in r]
    for row in timed:
        if row["family"] == "ours-vmoba":
            row["target"] = f"≤ density {row['density']:.3f} × cuDNN / {VMOBA_MARGIN}"
            row["target_ms"] = [row["density"] * dense[key] / VMOBA_MARGIN for key in ("fwd_ms", "fwd_bwd_ms")]
            row["target_met"] = [row[key] <= bound for key, bound in zip(("fwd_ms", "fwd_bwd_ms"), row["target_ms"])]
        elif row["family"] == "ours-hybrid-selected":
            ours_vsa = next(r for r in timed if r["family"] == "ours-vsa" and r["sparsity"] == row["sparsity"])
            row["target"] = f"≤ {HYBRID_SELECTED_MARGIN} × ours vsa"
            row["target_ms"] = [HYBRID_SELECTED_MARGIN * ours_vsa[key] for key in ("fwd_ms", "fwd_bwd_ms")]
            row["target_met"] = [row[key] <= bound for key, bound in zip(("fwd_ms", "fwd_bwd_ms"), row["target_ms"])]
        elif row["family"] == "ours-vsa":
            rivals = [r for r in timed if r["family"] == "fastvideo-kernel" and r["sparsity"] == row["sparsity"]]
            if not rivals:
                continue
            row["target"] = "< best fastvideo-kernel row"
            row["target_ms"] = [min(r[key] for r in rivals) for key in ("fwd_ms", "fwd_bwd_ms")]
            row["target_met"] = [row[key] < bound for key, bound in zip(("fwd_ms", "fwd_bwd_ms"), row["target_ms"])]


# ---- report -------------------------------------------------------------------------------------
def table(rows: list[dict], grids: dict[str, VideoGrid], setup: Setup) -> str:
    lines = []
    for label, grid in grids.items():
        shape_rows = [r for r in rows if r["shape"] == label]
        dense = shape_rows[0]
        one_square = grid.tokens**2 * torch.finfo(setup.dtype).bits / 8 / 2**30
        lines += [f"\n{label}: grid {grid} = {grid.tokens} tokens, {setup.heads} heads × {setup.head_dim}, "
                  f"{str(setup.dtype).removeprefix('torch.')}; one [S, S] matrix would be {one_square:.2f} GiB "
                  f"({setup.heads}× that for all heads)",
                  "| what | fwd ms | fwd+bwd ms | peak GiB fwd / fwd+bwd | × cuDNN fwd / fwd+bwd "
                  "| target fwd / fwd+bwd ms | met fwd / fwd+bwd |",
                  "|---|---|---|---|---|---|---|"]
        for r in shape_rows:
            if "missing" in r:
                lines.append(f"| {r['name']} | {r['missing']} | | | | | |")
                continue
            speedup = f"{dense['fwd_ms'] / r['fwd_ms']:.2f} / {dense['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}"
            target = met = ""
            if "target_ms" in r:
                target = f"{r['target']}: {r['target_ms'][0]:.2f} / {r['target_ms'][1]:.2f}"
                met = " / ".join("yes" if m else "no" for m in r["target_met"])
            name = r["name"] + (f", density {r['density']:.3f} (computed {r['computed_density']:.3f})"
                                if "density" in r else "")
            lines.append(f"| {name} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {gib(r['fwd_peak_gib'])} / "
                         f"{gib(r['fwd_bwd_peak_gib'])} | {speedup} | {target} | {met} |")
        densities = [r["density"] for r in shape_rows if "density" in r]
        if densities:
            lines.append(f"\nvmoba densities {min(densities):.3f}–{max(densities):.3f} come from random normal q, k: "
                         "block scores are near uniform there, so the global threshold keeps what it would not keep "
                         "on a trained Wan layer's q, k; the target scales with whatever density was measured. "
                         "'computed': the share of pairs the path computes (cuDNN: each key block's choosers "
                         "padded to the longest list of its block size; Triton: in whole "
                         f"{selected_blocks.CHUNK}-query chunks).")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1.3b"], choices=list(SHAPES))
    parser.add_argument("--json", help="write all rows here")
    parser.add_argument("--no-vmoba", action="store_true", help="leave out the vmoba rows")
    parser.add_argument("--no-vsa", action="store_true", help="leave out the vsa, hybrid_selected and peer rows")
    parser.add_argument("--sweep", action="store_true", help="first sweep the vmoba kernels' launch configs (GPU)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"CPU, grid {SMOKE_GRID}, {SMOKE.heads} heads × {SMOKE.head_dim}, fp32, no peers; "
                             "needs TRITON_INTERPRET=1 in the environment; checks code paths, timings mean nothing")
    args = parser.parse_args()
    log = lambda s: print(s, flush=True)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--smoke runs the Triton kernels on CPU: set TRITON_INTERPRET=1 before starting python")
        setup, grids, peers = SMOKE, {"smoke": SMOKE_GRID}, []
        device = "CPU smoke run (Triton interpreter; peers skipped; timings mean nothing)"
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --smoke on CPU)")
        setup, grids, peers = GPU, {label: SHAPES[label] for label in args.shapes}, load_peers()
        device = f"{torch.cuda.get_device_name()}, cuDNN {torch.backends.cudnn.version()}"
    log(f"{device}; torch {torch.__version__}, triton {triton.__version__}")
    for peer in peers:
        loaded = "loaded" + (f"; {peer.note}" if peer.note else "")
        log(f"peer {peer.name}: " + (f"not available: {peer.missing}" if peer.call is None else loaded))
    if args.sweep and setup.cuda:
        sweep_vmoba(SHAPES["1.3b"], setup, log)
    torch.manual_seed(0)
    rows = [row for label, grid in grids.items()
            for row in run_shape(label, grid, setup, peers, log, () if args.no_vmoba else VMOBA_LAYERS, args.no_vsa)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, torch=torch.__version__, triton=triton.__version__, rows=rows), f, indent=1)
    print(table(rows, grids, setup))


if __name__ == "__main__":
    main()
