import pytest
import torch

from surgery.errors import SurgeryError
from surgery.grid import ForwardContext, VideoGrid, block_layout, video_grid


def test_wan_1_3b_grid():
    grid = video_grid(81, 480, 832)
    assert grid == VideoGrid(21, 30, 52) and grid.tokens == 32_760
    assert video_grid(81, 720, 1280).tokens == 75_600


@pytest.mark.parametrize("frames,height,width", [(80, 480, 832), (81, 470, 832), (81, 480, 0), (0, 480, 832)])
def test_bad_video_sizes(frames, height, width):
    with pytest.raises(SurgeryError):
        video_grid(frames, height, width)


@pytest.mark.parametrize("grid,block", [((6, 10, 10), (4, 4, 4)), ((5, 3, 7), (2, 2, 3)), ((3, 4, 5), (9, 1, 2))])
def test_block_layout_is_a_partition_in_block_order(grid, block):
    grid = VideoGrid(*grid)
    layout = block_layout(grid, block)
    assert sorted(layout.order.tolist()) == list(range(grid.tokens))
    assert int(layout.sizes.sum()) == grid.tokens
    blocks_in_order = layout.block_of_token[layout.order]
    assert torch.equal(blocks_in_order, torch.sort(blocks_in_order).values)
    # Recompute each token's block from its coordinates, independently of the implementation.
    bt, bh, bw = (min(b, g) for b, g in zip(block, grid.shape))
    nh, nw = -(-grid.height // bh), -(-grid.width // bw)
    for n in range(grid.tokens):
        t, rest = divmod(n, grid.height * grid.width)
        h, w = divmod(rest, grid.width)
        assert layout.block_of_token[n] == ((t // bt) * nh + h // bh) * nw + w // bw


def test_forward_context_reads_the_patched_shape():
    ctx = ForwardContext((1, 2, 2))
    ctx(None, (torch.zeros(1, 16, 6, 20, 12),), {})
    assert ctx.grid == VideoGrid(6, 10, 6)


@pytest.mark.parametrize("grid,block,equal", [((6, 8, 10), (3, 4, 5), True), ((5, 3, 7), (2, 2, 3), False)])
def test_block_means(grid, block, equal):
    """`mean_pool_blocks` on whole blocks (gather and mean) and on partial ones (index_add), against a loop."""
    from surgery.variants.block_select import mean_pool_blocks

    layout = block_layout(VideoGrid(*grid), block)
    assert layout.equal_blocks == equal
    x = torch.randn(2, layout.order.numel(), 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.stack([x[:, layout.block_of_token == j].mean(1) for j in range(layout.num_blocks)], 1)
    torch.testing.assert_close(mean_pool_blocks(x, layout), expected)


def test_forward_context_marks_forwards_at_or_above_the_dense_boundary():
    ctx = ForwardContext((1, 2, 2))
    latents = torch.zeros(1, 16, 2, 4, 4)
    ctx(None, (latents,), {"timestep": torch.tensor([950.0])})
    assert not ctx.dense  # no boundary: never dense
    ctx.dense_boundary = 0.9
    ctx(None, (latents, torch.tensor([900.0])), {})
    assert ctx.dense
    ctx(None, (latents,), {"timestep": torch.tensor([[0.0, 899.0]])})  # one per token: the largest decides
    assert not ctx.dense
    ctx(None, (latents,), {"timestep": torch.tensor([950.0])})
    ctx.dense_boundary = None  # a plan without dense steps applied since
    ctx(None, (latents,), {"timestep": torch.tensor([950.0])})
    assert not ctx.dense
