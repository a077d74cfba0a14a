"""Key-block-major attention over per-query block choices (Triton) against its plain-PyTorch reference.

CPU: Triton's interpreter at tiny shapes (partial key blocks, several heads, batch 2), fp32, relative error
≤ 1e-3 against the reference in fp64; the cuDNN path with PyTorch stand-ins for cuDNN's attention. GPU (`-m gpu`): VMoBA's 1.3B shape in bf16, ≤ 1e-2 against the
reference in fp32 on the same bf16 inputs, with NaN-poisoned outputs.
"""

import itertools
import math

import pytest
import torch

from surgery.grid import VideoGrid, block_layout
from surgery.kernels import selected_blocks as sb
from surgery.kernels.cudnn_attention import attention_backward_reference, attention_forward_reference
from surgery.kernels.selected_blocks import list_pairs, selected_block_attention, selected_block_attention_reference

from .conftest import deterministic_algorithms

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def block_offsets(sizes, device):
    return torch.nn.functional.pad(torch.tensor(sizes, device=device).cumsum(0), (1, 0))


def check_against_reference(q, k, v, block_mask, offsets, max_block, tol):
    """Kernel and reference on the same inputs: out, lse (finite where the reference's is) and dq, dk, dv."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = selected_block_attention(q, k, v, block_mask, offsets, max_block)
    ref_dtype = torch.float64 if q.dtype == torch.float32 else torch.float32
    rq, rk, rv = (t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v))
    ref, ref_lse = selected_block_attention_reference(rq, rk, rv, block_mask, offsets, max_block)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.to(ref_dtype))
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen), "queries that chose nothing must have lse -inf"
    assert (out.float()[~seen.transpose(1, 2)] == 0).all(), "queries that chose nothing must output 0"
    errors = {"out": rel_err(out, ref), "lse": rel_err(lse[seen], ref_lse[seen]), "dq": rel_err(q.grad, rq.grad),
              "dk": rel_err(k.grad, rk.grad), "dv": rel_err(v.grad, rv.grad)}
    assert all(e <= tol for e in errors.values()), errors
    return errors


@pytest.mark.parametrize("batch,heads,queries,sizes,density", [
    (2, 2, 37, (20, 7, 33, 1), 0.4),  # partial chunks, a one-token block, blocks longer than one key step
    (1, 3, 70, (16, 16, 16), 0.7),  # more than one 64-query chunk per block
    (2, 1, 9, (5, 70), 0.2),  # some queries choose nothing; a block longer than one 64-key program
    (1, 2, 128, (64, 128), 1.0),  # whole key steps and pair steps only (64 or 32 wide): no masked step
    (1, 1, 150, (20, 70), 0.9),  # over 64 pairs a block: whole pair steps, then a masked one
])
def test_matches_reference(batch, heads, queries, sizes, density):
    generator = torch.Generator().manual_seed(sum(sizes) + queries)
    q = torch.randn(batch, queries, heads, 16, generator=generator)
    k, v = (torch.randn(batch, sum(sizes), heads, 16, generator=generator) for _ in range(2))
    block_mask = torch.rand(batch, heads, queries, len(sizes), generator=generator) < density
    check_against_reference(q, k, v, block_mask, block_offsets(sizes, "cpu"), max(sizes), 1e-3)


@pytest.mark.parametrize("path", ["triton", "padded"])
def test_heads_in_groups_when_partials_outgrow_the_cap(monkeypatch, request, path):
    """A cap of two heads' per-pair buffers splits 5 heads into groups; results as the reference's, on both paths."""
    if path == "padded":
        request.getfixturevalue("padded_path")
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(2, 21, 5, 16, generator=generator)
    k, v = (torch.randn(2, 30, 5, 16, generator=generator) for _ in range(2))
    block_mask = torch.rand(2, 5, 21, 3, generator=generator) < 0.5
    pairs_per_head = block_mask.sum(dim=(0, 2, 3))
    monkeypatch.setattr(sb, "PARTIAL_BYTES", int(pairs_per_head[:2].sum()) * sb.pair_bytes(16, q.element_size()))
    groups = sb.head_groups(block_mask, sb.pair_bytes(16, q.element_size()))
    assert len(groups) >= 3 and groups[0][0] == 0 and groups[-1][1] == 5
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    check_against_reference(q, k, v, block_mask, block_offsets((10, 13, 7), "cpu"), 13, 1e-3)


@pytest.mark.parametrize("entries, heads", [(sb.LIST_ENTRIES, slice(None)), (16, slice(None)), (16, slice(1, 3))],
                         ids=["one-tile", "tiles", "head-slice"])
def test_pair_lists_index_every_pair_both_ways(monkeypatch, entries, heads):
    """Every pair once in each order, key-major groups in ascending tokens; with `entries` 16 the listing kernels
    take 16 queries a program (3 tiles, the last partial), and a head slice of the mask is not contiguous."""
    monkeypatch.setattr(sb, "LIST_ENTRIES", entries)
    block_mask = (torch.rand(2, 4, 37, 4, generator=torch.Generator().manual_seed(0)) < 0.5)[:, heads]
    pairs = list_pairs(block_mask, block_offsets((2, 5, 1, 3), "cpu"), chunk=3)
    B, H, S, n = block_mask.shape
    expected = block_mask.nonzero().tolist()  # query-major: (b, h, s, j)
    assert pairs.pairs == len(expected)
    for row, (query, slot) in enumerate(zip(pairs.pair_query.tolist(), pairs.pair_slot.tolist())):
        b, h, s, j = expected[slot]
        group = (b * H + h) * n + j
        assert s == query and pairs.group_offsets[group] <= row < pairs.group_offsets[group + 1]
    first_rows = pairs.group_offsets[:-1].long()
    same_group = torch.ones(pairs.pairs, dtype=torch.bool).index_fill_(0, first_rows[first_rows < pairs.pairs], False)
    assert (pairs.pair_query.diff() > 0)[same_group[1:]].all()
    assert torch.equal(pairs.query_offsets.diff(), block_mask.sum(-1).flatten().int())
    bounds = pairs.group_offsets.tolist()
    assert pairs.chunks.tolist() == [[first, min(first + 3, end), group]
                                     for group, (start, end) in enumerate(itertools.pairwise(bounds))
                                     for first in range(start, end, 3)]
    per_block = block_mask.sum(2).view(-1, n)  # [B·H, n] choosers of each block
    assert pairs.key_sizes == (2, 5, 1, 3) and pairs.block_pairs == tuple(per_block.sum(0).tolist())
    assert pairs.block_rows == tuple(per_block.amax(0).tolist())


def test_rejects_bad_arguments():
    q = k = v = torch.randn(1, 8, 2, 16)
    offsets = block_offsets((4, 4), "cpu")
    with pytest.raises(ValueError, match="block_mask must be bool"):
        selected_block_attention(q, k, v, torch.ones(1, 2, 8, 3, dtype=torch.bool), offsets, 4)
    with pytest.raises(ValueError, match="block_mask must be bool"):
        selected_block_attention(q, k, v, torch.ones(1, 2, 8, 2), offsets, 4)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        selected_block_attention(q[..., :12], k[..., :12], v[..., :12], torch.ones(1, 2, 8, 2, dtype=torch.bool),
                                 offsets, 4)


@gpu
@needs_cuda
@pytest.mark.parametrize("block", [(3, 30, 52), (3, 5, 13), (3, 7, 11)])  # 1D (4,680 keys), 3D, 3D of 4 sizes
@pytest.mark.parametrize("min_fill,deterministic", [(0.0, False), (0.0, True), (math.inf, False)],
                         ids=["cudnn", "cudnn-forward-triton-backward", "triton"])
def test_gpu_bf16_every_output_written(poisoned_empty, monkeypatch, block, min_fill, deterministic):
    """Wan2.1-1.3B's frame size (30×52) over 9 frames, 2 heads × 128, ~25% of blocks per query (own block kept),
    through each path: cuDNN (its backward not in deterministic mode) or the Triton kernels."""
    monkeypatch.setattr(sb, "MIN_PADDED_FILL", min_fill)
    monkeypatch.setattr(sb, "MIN_PADDED_KEYS", 0)
    generator = torch.Generator().manual_seed(3)
    layout = block_layout(VideoGrid(9, 30, 52), block, "cuda")
    tokens, heads = layout.order.numel(), 2
    q, k, v = (torch.randn(1, tokens, heads, 128, generator=generator).cuda().bfloat16() for _ in range(3))
    block_mask = torch.rand(1, heads, tokens, layout.num_blocks, generator=generator).cuda() < 0.25
    block_mask |= torch.nn.functional.one_hot(layout.block_of_token, layout.num_blocks).bool()
    with deterministic_algorithms(deterministic):
        print(check_against_reference(q, k, v, block_mask, layout.offsets, int(layout.sizes.max()), 1e-2))


@gpu
@needs_cuda
def test_gpu_fp32_head_dim_128(poisoned_empty):
    """fp32 at head_dim 128 (the Triton kernels; cuDNN's attention takes no fp32): the launch settings fit shared
    memory (`fitted_to_dtype`); ≤ 1e-3 against the reference in fp64."""
    generator = torch.Generator().manual_seed(8)
    layout = block_layout(VideoGrid(3, 10, 16), (1, 10, 16), "cuda")  # 160-key blocks: whole steps and a tail
    tokens, heads = layout.order.numel(), 2
    q, k, v = (torch.randn(1, tokens, heads, 128, generator=generator).cuda() for _ in range(3))
    block_mask = torch.rand(1, heads, tokens, layout.num_blocks, generator=generator).cuda() < 0.5
    print(check_against_reference(q, k, v, block_mask, layout.offsets, int(layout.sizes.max()), 1e-3))

@pytest.fixture
def padded_path(monkeypatch):
    """The cuDNN path with PyTorch stand-ins for cuDNN's attention, taken whatever the padding; counts the calls."""
    calls = {"forward": 0, "backward": 0}

    def counted(name, fn):
        def call(*args):
            calls[name] += 1
            return fn(*args)
        return lambda q: call

    monkeypatch.setattr(sb, "dense_attention_forward_for", counted("forward", attention_forward_reference))
    monkeypatch.setattr(sb, "dense_attention_backward_for", counted("backward", attention_backward_reference))
    monkeypatch.setattr(sb, "MIN_PADDED_FILL", 0.0)
    monkeypatch.setattr(sb, "MIN_PADDED_KEYS", 0)
    return calls


@pytest.mark.parametrize("batch,heads,queries,sizes,density", [
    (2, 2, 37, (20, 7, 33, 1, 7), 0.4),  # four block sizes: keys gathered per size
    (1, 3, 70, (16, 16, 16), 0.7),  # one size: keys reshaped in place
    (2, 1, 9, (5, 70, 5), 0.2),  # some queries choose nothing, some blocks are chosen by nobody
])
def test_padded_path_matches_reference(padded_path, batch, heads, queries, sizes, density):
    generator = torch.Generator().manual_seed(sum(sizes) + queries + 1)
    q = torch.randn(batch, queries, heads, 16, generator=generator)
    k, v = (torch.randn(batch, sum(sizes), heads, 16, generator=generator) for _ in range(2))
    block_mask = torch.rand(batch, heads, queries, len(sizes), generator=generator) < density
    check_against_reference(q, k, v, block_mask, block_offsets(sizes, "cpu"), max(sizes), 1e-3)
    assert padded_path["forward"] >= 1 and padded_path["backward"] >= 1


@pytest.mark.parametrize("gate,value", [("MIN_PADDED_FILL", 1.01), ("MIN_PADDED_KEYS", 9)])
def test_padded_path_needs_fill_and_long_blocks(padded_path, monkeypatch, gate, value):
    """Below MIN_PADDED_FILL, or with key blocks shorter than MIN_PADDED_KEYS, the Triton kernels run."""
    monkeypatch.setattr(sb, gate, value)
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 24, 2, 16, generator=generator) for _ in range(3))
    block_mask = torch.rand(1, 2, 24, 3, generator=generator) < 0.5
    check_against_reference(q, k, v, block_mask, block_offsets((8, 8, 8), "cpu"), 8, 1e-3)
    assert padded_path == {"forward": 0, "backward": 0}


def test_padded_problems_hold_each_pair_once():
    """Every pair slot has its own padded row, in the problem of its (batch, head, block), pointing back at its
    query; every other padded row points at the zero row; each size's keys are its blocks' keys."""
    generator = torch.Generator().manual_seed(2)
    B, H, S, sizes = 2, 3, 13, (4, 6, 4, 6, 3)
    block_mask = torch.rand(B, H, S, len(sizes), generator=generator) < 0.4
    offsets = block_offsets(sizes, "cpu")
    pairs = list_pairs(block_mask, offsets, sb.CHUNK)
    problems = sb.padded_problems(pairs, offsets, B, H, S)
    assert sorted(p.key_size for p in problems.sizes) == [3, 4, 6]
    assert problems.part_row.unique().numel() == pairs.pairs
    for slot, (b, h, s, j) in enumerate(block_mask.nonzero().tolist()):  # query-major, as the slots
        row = int(problems.part_row[slot])
        assert problems.query_row[row] == (b * S + s) * H + h and problems.value_row[row] == (b * H + h) * S + s
        size = next(p for p in problems.sizes if p.first_row <= row < p.first_row + B * len(p.blocks) * H * p.rows)
        problem, head = divmod((row - size.first_row) // size.rows, H)
        assert head == h and divmod(problem, len(size.blocks)) == (b, size.blocks.index(j))
    padding = torch.ones(problems.padded_rows, dtype=torch.bool).index_fill_(0, problems.part_row, False)
    assert (problems.query_row[padding] == B * S * H).all() and (problems.value_row[padding] == B * H * S).all()
    assert sb.padded_fill(pairs, B, H) == pairs.pairs / problems.padded_rows
    keys = torch.arange(int(offsets[-1])).view(1, -1, 1, 1).expand(B, -1, H, 1).float()
    for p in problems.sizes:
        expected = offsets[torch.tensor(p.blocks)].unsqueeze(1) + torch.arange(p.key_size)
        assert torch.equal(p.keys(keys)[:, 0, :, 0], expected.float().repeat(B, 1))
