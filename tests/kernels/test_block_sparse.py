"""Block-sparse attention kernel (Triton) against its plain-PyTorch reference: output, lse and every gradient.

On CPU the kernel runs in Triton's interpreter (tests/kernels/__init__.py) at tiny shapes in fp32,
relative error ≤ 1e-3 against the reference in fp64. GPU tests (`-m gpu`) use real shapes in bf16,
relative error ≤ 1e-2 against the reference in fp32 on the same bf16 inputs.
"""

import math

import pytest
import torch

from surgery.grid import VideoGrid, block_layout
from surgery.kernels import block_sparse as bs
from surgery.kernels import block_sparse_attention, block_sparse_attention_reference
from surgery.kernels.tile_order import tile_permutation, to_raster_order, to_tile_order

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def random_selection(batch, heads, n_q, n_kv, max_k, generator, device=DEVICE, full=False):
    """Distinct random key blocks per query tile, in random order, with random counts (some zero)."""
    index = torch.rand(batch, heads, n_q, n_kv, generator=generator).argsort(-1)[..., :max_k].int()
    shape = (batch, heads, n_q)
    count = torch.full(shape, max_k) if full else torch.randint(0, max_k + 1, shape, generator=generator)
    # Garbage in unused slots must be ignored.
    index = torch.where(torch.arange(max_k) < count[..., None], index, -7)
    return index.to(device), count.int().to(device)


def check_against_reference(q, k, v, args, kwargs, tol):
    """Run kernel and reference on the same inputs; compare out, lse and dq, dk, dv."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = block_sparse_attention(q, k, v, *args, **kwargs)
    ref_dtype = torch.float64 if q.dtype == torch.float32 else torch.float32
    rq, rk, rv = (t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v))
    ref, ref_lse = block_sparse_attention_reference(rq, rk, rv, *args, **kwargs)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.to(ref_dtype))
    errors = {"out": rel_err(out, ref), "dq": rel_err(q.grad, rq.grad), "dk": rel_err(k.grad, rk.grad),
              "dv": rel_err(v.grad, rv.grad)}
    seen = torch.isfinite(ref_lse)
    errors["lse"] = rel_err(lse[seen], ref_lse[seen])
    assert torch.equal(torch.isfinite(lse), seen), "queries with no visible key must have lse -inf"
    assert (out.float()[~seen.transpose(1, 2)] == 0).all(), "queries with no visible key must output 0"
    assert all(e <= tol for e in errors.values()), errors
    return errors


@pytest.mark.parametrize(
    "grid,tile,batch,heads,head_dim",
    [((3, 5, 6), (2, 2, 4), 2, 2, 16), ((2, 6, 5), (2, 3, 3), 1, 3, 32), ((5, 6, 5), (4, 4, 4), 2, 2, 16)],
    ids=["3x5x6-tile2x2x4-b2h2d16", "2x6x5-tile2x3x3-b1h3d32", "5x6x5-tile4x4x4-b2h2d16"],
)
def test_tiles_partial_blocks(grid, tile, batch, heads, head_dim):
    """VSA's fine stage: query tiles = key blocks = the grid's tiles, edge tiles partial, no padding. The
    last two cases have tiles of at most half a kernel tile (16 or 32 rows), which take the half steps."""
    g = torch.Generator().manual_seed(hash((grid, tile)) % 2**31)
    layout = block_layout(VideoGrid(*grid), tile, DEVICE)
    n, S = layout.num_blocks, layout.order.numel()
    assert int(layout.sizes.min()) < math.prod(tile), "the case must have partial tiles"
    index, count = random_selection(batch, heads, n, n, max_k=3, generator=g)
    q, k, v = (torch.randn(batch, S, heads, head_dim, generator=g).to(DEVICE) for _ in range(3))
    args = (index, count, layout.offsets, layout.offsets)
    check_against_reference(q, k, v, args, dict(max_q_tile=math.prod(tile), max_kv_block=math.prod(tile)), 1e-3)


def test_heads_first_layout_and_scale():
    """[B, H, S, D] tensors go in as transposed views; outputs and gradients keep their strides."""
    g = torch.Generator().manual_seed(1)
    offsets = torch.tensor([0, 16, 30, 46, 50], device=DEVICE)
    index, count = random_selection(2, 2, 4, 4, max_k=2, generator=g, full=True)
    q, k, v = (torch.randn(2, 2, 50, 16, generator=g).to(DEVICE).transpose(1, 2) for _ in range(3))
    check_against_reference(q, k, v, (index, count, offsets, offsets), dict(max_q_tile=16, max_kv_block=16, scale=0.3), 1e-3)
    out, _ = block_sparse_attention(q, k, v, index, count, offsets, offsets, 16, 16)
    assert out.stride() == q.stride()


def test_chunked_blocks():
    """Key blocks longer than one kernel tile (the chunked path), of uneven lengths, and query tiles of 40 and
    20 (a half step of the 64-row tile) that cut across them; some tiles visit no block."""
    g = torch.Generator().manual_seed(2)
    B, H, D, kv_sizes = 2, 2, 16, (140, 30, 70)
    kv_offsets = torch.tensor([0, *torch.tensor(kv_sizes).cumsum(0).tolist()], device=DEVICE)
    S = int(kv_offsets[-1])
    q_offsets = torch.tensor([*range(0, S, 60), *range(40, S, 60), S], device=DEVICE).sort().values
    index, count = random_selection(B, H, q_offsets.numel() - 1, len(kv_sizes), max_k=2, generator=g)
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(DEVICE) for _ in range(3))
    args = (index, count, q_offsets, kv_offsets)
    check_against_reference(q, k, v, args, dict(max_q_tile=40, max_kv_block=max(kv_sizes)), 1e-3)


def test_listed_ranges_puts_long_blocks_first():
    g = torch.Generator().manual_seed(4)
    offsets = torch.tensor([0, 30, 33, 60, 64, 70, 100], device=DEVICE)  # sizes 30, 3, 27, 4, 6, 30
    index, count = random_selection(2, 3, 5, 6, max_k=4, generator=g)
    ranges, n_long = bs.listed_ranges(index, count, offsets, short=8)
    for b, h, i in torch.cartesian_prod(*(torch.arange(n) for n in (2, 3, 5))).tolist():
        listed = bs.token_ranges(index[b, h, i, : count[b, h, i]], offsets).tolist()
        long = [r for r in listed if r[1] - r[0] > 8]
        assert ranges[b, h, i, : count[b, h, i]].tolist() == long + [r for r in listed if r[1] - r[0] <= 8]
        assert n_long[b, h, i] == len(long)
    # short 0: every used slot is long, in list order.
    ranges, n_long = bs.listed_ranges(index, count, offsets, short=0)
    used = torch.arange(4, device=DEVICE) < count[..., None]
    assert torch.equal(ranges[used], bs.token_ranges(index, offsets)[used])
    assert torch.equal(n_long, count)


def test_invert_block_index():
    g = torch.Generator().manual_seed(3)
    index, count = random_selection(2, 3, 7, 5, max_k=4, generator=g)
    q_offsets = torch.tensor([0, 3, 4, 9, 12, 20, 21, 30], device=DEVICE)
    ptr, ranges = bs.invert_block_index(index, count, q_offsets, 5, short_q_tile=3)
    for bh in range(6):
        b, h = divmod(bh, 3)
        for j in range(5):
            tiles = [i for i in range(7) if j in index[b, h, i, : count[b, h, i]].tolist()]
            expected = [[q_offsets[i].item(), q_offsets[i + 1].item()] for i in tiles]
            long, short = ranges[bh, ptr[bh, 2 * j]: ptr[bh, 2 * j + 1]], ranges[bh, ptr[bh, 2 * j + 1]: ptr[bh, 2 * j + 2]]
            assert long.tolist() == [r for r in expected if r[1] - r[0] > 3]
            assert short.tolist() == [r for r in expected if r[1] - r[0] <= 3]


def test_tile_order_round_trip_and_gradient():
    grid = VideoGrid(3, 5, 6)
    order, inverse = tile_permutation(grid, (2, 2, 4), torch.device(DEVICE))
    x = torch.randn(2, grid.tokens, 3, 4, device=DEVICE, requires_grad=True)
    tiled = to_tile_order(x, order, inverse)
    assert torch.equal(tiled, x[:, block_layout(grid, (2, 2, 4), DEVICE).order])
    assert torch.equal(to_raster_order(tiled, order, inverse), x)
    grad = torch.randn_like(tiled)
    tiled.backward(grad)
    assert torch.equal(x.grad, to_raster_order(grad, order, inverse))


def test_rejects_bad_shapes():
    q = torch.randn(1, 32, 2, 16)
    offsets = torch.tensor([0, 16, 32])
    index, count = torch.zeros(1, 2, 2, 1, dtype=torch.int32), torch.ones(1, 2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="head_dim"):
        block_sparse_attention(q[..., :12], q[..., :12], q[..., :12], index, count, offsets, offsets, 16, 16)
    with pytest.raises(ValueError, match="kv_block_index"):
        block_sparse_attention(q, q, q, index[:, :1], count, offsets, offsets, 16, 16)


# ---- GPU: real shapes in bf16 ---------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("sparsity", [0.875, 0.5])
def test_gpu_vsa_tiles_bf16(poisoned_empty, sparsity):
    """Wan2.1-1.3B's frame size (30×52) over 9 frames, 4×4×4 tiles, 4 heads × 128, top-k key tiles."""
    g = torch.Generator().manual_seed(4)
    layout = block_layout(VideoGrid(9, 30, 52), (4, 4, 4), "cuda")
    n, S, H = layout.num_blocks, layout.order.numel(), 4
    top_k = math.ceil((1 - sparsity) * n)
    index = torch.rand(1, H, n, n, generator=g).topk(top_k, dim=-1).indices.int().cuda()
    count = torch.full((1, H, n), top_k, dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(1, S, H, 128, generator=g).cuda().bfloat16() for _ in range(3))
    errors = check_against_reference(q, k, v, (index, count, layout.offsets, layout.offsets), {}, 1e-2)
    print(errors)


@gpu
@needs_cuda
def test_gpu_chunked_frames_bf16(poisoned_empty):
    """1D blocks of 2 whole frames (3,120 tokens, chunked), 64-query tiles each visiting random blocks."""
    g = torch.Generator().manual_seed(5)
    layout = block_layout(VideoGrid(9, 30, 52), (2, 30, 52), "cuda")
    S, H, n_kv = layout.order.numel(), 2, layout.num_blocks
    q_offsets = torch.tensor([*range(0, S, 64), S], device="cuda")
    index, count = random_selection(1, H, q_offsets.numel() - 1, n_kv, max_k=3, generator=g, device="cuda")
    q, k, v = (torch.randn(1, S, H, 128, generator=g).cuda().bfloat16() for _ in range(3))
    kwargs = dict(max_q_tile=64, max_kv_block=int(layout.sizes.max()))
    print(check_against_reference(q, k, v, (index, count, q_offsets, layout.offsets), kwargs, 1e-2))


@gpu
@needs_cuda
@pytest.mark.parametrize("chunked", [False, True], ids=["tiles", "chunked"])
def test_gpu_fp32_head_dim_128(poisoned_empty, chunked):
    """fp32 at head_dim 128 with 64-token tiles (some partial) or 256-key blocks walked in chunks: the launch
    settings fit shared memory (`fitted_to_dtype`); ≤ 1e-3 against the reference in fp64 (fp32 products)."""
    g = torch.Generator().manual_seed(6)
    layout = block_layout(VideoGrid(5, 8, 16), (2, 8, 16) if chunked else (4, 4, 4), "cuda")
    S, H, n = layout.order.numel(), 2, layout.num_blocks
    q_offsets = torch.tensor([*range(0, S, 64), S], device="cuda") if chunked else layout.offsets
    index, count = random_selection(1, H, q_offsets.numel() - 1, n, max_k=2, generator=g, device="cuda")
    q, k, v = (torch.randn(1, S, H, 128, generator=g).cuda() for _ in range(3))
    kwargs = dict(max_q_tile=64, max_kv_block=int(layout.sizes.max()))
    print(check_against_reference(q, k, v, (index, count, q_offsets, layout.offsets), kwargs, 1e-3))
