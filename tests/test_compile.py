"""torch.compile of a retrofitted transformer: blocks compile whole (no graph break), and the kernel path is
one custom op (`vsurgery::variant_attention`) whose forward and gradients are the kernels' own."""

import copy
import warnings

import pytest
import torch

import surgery
from surgery.grid import VideoGrid
from surgery.plan import LayerChoice, Plan
from surgery.timing import blocks_compiled
from surgery.variants.base import variant_attention
from surgery.variants.hybrid import HybridConfig
from surgery.variants.linear import LinearConfig
from surgery.variants.vmoba import VMoBAConfig
from surgery.variants.vsa import VideoSparseAttention, VSAConfig
from surgery.wan import fingerprint

from .conftest import model_inputs

GRID = VideoGrid(4, 6, 6)


def mixed_plan(model, select: str) -> Plan:
    layers = {
        "blocks.0.attn1": LayerChoice("hybrid", HybridConfig(rate=4)),
        "blocks.1.attn1": LayerChoice("vsa", VSAConfig(sparsity=0.5)),
        "blocks.2.attn1": LayerChoice("vmoba", VMoBAConfig(select=select)),
        "blocks.3.attn1": LayerChoice("linear", LinearConfig()),
    }
    return Plan("tiny", fingerprint(model.config), len(model.blocks), layers)


@pytest.mark.parametrize("select", ["topk", "threshold"])
def test_compiled_blocks_match_eager_on_the_reference_path(tiny_model, select):
    """Every block of a model with all four variants compiles with fullgraph=True (a graph break is an error)
    and gives eager's output."""
    model = surgery.apply(tiny_model, mixed_plan(tiny_model, select))
    inputs = model_inputs(model, GRID, batch=1)
    with torch.no_grad():
        eager = model(**inputs).sample
        for block in model.blocks:
            block.compile(fullgraph=True, backend="aot_eager")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dynamo notes that it traces through block_layout's lru_cache
            compiled = model(**inputs).sample
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def vsa_processor():
    processor = VideoSparseAttention(VSAConfig(top_k=3), heads=2, head_dim=16, dim=32)
    with torch.no_grad():
        for p in processor.parameters():
            p.copy_(0.3 * torch.randn_like(p))  # an open gate, so its gradient is not trivially zero
    return processor


def test_variant_attention_op_is_the_kernel_path_forward_and_backward():
    """The custom op (what compiled code calls) against `attend_kernel` called directly, in the Triton
    interpreter on CPU: the same output, and the same gradients of q, k, v, x and the gate's parameters
    through the op's registered backward (fp32, relative error ≤ 1e-5)."""
    processor = vsa_processor()
    grid = VideoGrid(2, 5, 6)
    q, k, v = (torch.randn(1, grid.tokens, 2, 16, requires_grad=True) for _ in range(3))
    x = torch.randn(1, grid.tokens, 32, requires_grad=True)
    params = list(processor.parameters())
    inputs = [q, k, v, x, *params]
    grad = torch.randn(1, grid.tokens, 2, 16)

    direct = processor.attend_kernel(q, k, v, grid, x)
    direct_grads = torch.autograd.grad(direct, inputs, grad)
    through_op = variant_attention(q, k, v, x, params, list(grid.shape), processor.live_id)
    op_grads = torch.autograd.grad(through_op, inputs, grad)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(through_op, direct) <= 1e-5
    assert all(rel(a, b) <= 1e-5 for a, b in zip(op_grads, direct_grads))


def test_variant_attention_op_passes_torch_library_checks():
    """Schema, fake tensor (shape and dtype without running) and autograd registration."""
    processor = vsa_processor()
    grid = VideoGrid(2, 5, 6)
    q, k, v = (torch.randn(1, grid.tokens, 2, 16, requires_grad=True) for _ in range(3))
    x = torch.randn(1, grid.tokens, 32)
    args = (q, k, v, x, list(processor.parameters()), list(grid.shape), processor.live_id)
    torch.library.opcheck(variant_attention, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compiled_blocks_call_the_kernel_path_as_one_op(tiny_model, monkeypatch):
    """The kernel path under compile, on CPU: with the kernels forced on (the Triton interpreter runs them on CPU
    tensors), every block of a model with VSA and VMoBA layers compiles with fullgraph=True, the kernels hidden
    in `vsurgery::variant_attention`, and gives eager's kernel-path output."""
    from surgery.variants.base import AttentionVariant

    monkeypatch.setattr(AttentionVariant, "uses_kernel", lambda self, q: self.attend_kernel is not None)
    layers = {"blocks.1.attn1": LayerChoice("vsa", VSAConfig(sparsity=0.5)),
              "blocks.2.attn1": LayerChoice("vmoba", VMoBAConfig(select="topk"))}
    model = surgery.apply(tiny_model, Plan("tiny", fingerprint(tiny_model.config), 4, layers))
    inputs = model_inputs(model, VideoGrid(2, 4, 4), batch=1)
    with torch.no_grad():
        eager = model(**inputs).sample
        for block in model.blocks:
            block.compile(fullgraph=True, backend="aot_eager")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = model(**inputs).sample
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_blocks_with_the_same_variant_share_one_compiled_graph(tiny_model, monkeypatch):
    """`compile_repeated_blocks` on a model whose every layer is `vsa` (the kernel path forced on, as above)
    compiles one graph for all blocks: the processors differ only in data the graph takes as input, so there is
    no recompile per block (a 30-layer Wan would otherwise compile 30 graphs and hit dynamo's recompile limit)."""
    from torch._dynamo.utils import counters

    from surgery.variants.base import AttentionVariant

    monkeypatch.setattr(AttentionVariant, "uses_kernel", lambda self, q: self.attend_kernel is not None)
    layers = {f"blocks.{i}.attn1": LayerChoice("vsa", VSAConfig(sparsity=0.5)) for i in range(4)}
    model = surgery.apply(tiny_model, Plan("tiny", fingerprint(tiny_model.config), 4, layers))
    inputs = model_inputs(model, VideoGrid(2, 4, 4), batch=1)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        model(**inputs)
    assert counters["stats"]["unique_graphs"] == 1


def test_a_plan_with_dense_steps_compiles_one_graph_per_mode(tiny_model, monkeypatch):
    """A plan with dense first steps under `compile_repeated_blocks`: the blocks read the forward's dense flag
    (a Python bool) and compile once for each value, not once per call or per block; each mode gives eager's
    output, and the dense steps give the stock model's."""
    from torch._dynamo.utils import counters

    from surgery.variants.base import AttentionVariant

    monkeypatch.setattr(AttentionVariant, "uses_kernel", lambda self, q: self.attend_kernel is not None)
    stock = tiny_model
    layers = {f"blocks.{i}.attn1": LayerChoice("vsa", VSAConfig(sparsity=0.5)) for i in range(4)}
    plan = Plan("tiny", fingerprint(stock.config), 4, layers, dense_boundary=0.5)
    model = surgery.apply(copy.deepcopy(stock), plan)
    inputs = model_inputs(model, VideoGrid(2, 4, 4), batch=1)
    at = {"dense": 900.0, "planned": 100.0}
    with torch.no_grad():
        eager = {mode: model(**inputs | {"timestep": torch.tensor([t])}).sample for mode, t in at.items()}
        reference = {mode: stock(**inputs | {"timestep": torch.tensor([t])}).sample for mode, t in at.items()}
        torch._dynamo.reset()
        counters.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
            compiled = {mode: [model(**inputs | {"timestep": torch.tensor([t])}).sample for _ in range(2)]
                        for mode, t in at.items()}
    assert counters["stats"]["unique_graphs"] == 2
    for mode in at:
        for out in compiled[mode]:
            torch.testing.assert_close(out, eager[mode], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager["dense"], reference["dense"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eager["planned"], reference["planned"])


def test_blocks_compiled_runs_the_blocks_compiled_then_eager_again(tiny_model):
    """What the latency planner's compiled step timing relies on: inside, every block calls its compiled form
    (and the output is eager's); after, the model is as it was, nothing of the compile left on it."""
    inputs = model_inputs(tiny_model, GRID, batch=1)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = tiny_model(**inputs).sample
        with blocks_compiled(tiny_model, backend="eager"):
            assert all(block._compiled_call_impl is not None for block in tiny_model.blocks)
            compiled = tiny_model(**inputs).sample
        assert all(module._compiled_call_impl is None for module in tiny_model.modules())
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_skipped_core_keeps_q_and_k_alive_under_compile(tiny_model):
    """The attention-free yardstick under compile: the forward graph after aot_autograd still computes every
    linear layer of the block, q's and k's projections included (returning v as it is let the compiler drop
    them as dead code, and the compiled ceiling skipped more than the core). Values: v passes through."""
    from torch._dynamo.backends.common import aot_autograd

    from surgery.timing import attention_core_skipped

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    inputs = model_inputs(tiny_model, VideoGrid(2, 4, 4), batch=1)
    block = tiny_model.blocks[0]
    linears = sum(isinstance(m, torch.nn.Linear) for m in block.modules())
    torch._dynamo.reset()
    with torch.no_grad(), attention_core_skipped(tiny_model):
        eager = tiny_model(**inputs).sample
        tiny_model.blocks[0] = torch.compile(block, backend=aot_autograd(fw_compiler=capture))
        try:
            compiled = tiny_model(**inputs).sample
        finally:
            tiny_model.blocks[0] = block
    matmuls = sum(n.op == "call_function" and "addmm" in str(n.target) for g in graphs for n in g.graph.nodes)
    assert matmuls == linears
    torch.testing.assert_close(compiled, eager)


def test_skipped_core_op_registration():
    """The yardstick's op: schema, fake implementation and autograd (v's gradient passes, q and k get zeros)."""
    from surgery.timing import skipped_core

    q, k, v = (torch.randn(1, 6, 2, 4, requires_grad=True) for _ in range(3))
    torch.library.opcheck(skipped_core, (q, k, v))
    out = skipped_core(q, k, v)
    upstream = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), upstream)
    assert torch.equal(out, v) and out.data_ptr() != v.data_ptr()
    assert torch.equal(dv, upstream) and not dq.any() and not dk.any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["blocks", "whole"])
def test_compiled_kernel_path_matches_eager_on_gpu(mode):
    """On CUDA (the kernels behind the custom op), a bf16 retrofitted model compiled by inductor gives eager's
    output within bf16 tolerance, both through `compile_repeated_blocks` and `torch.compile(model)`."""
    model = surgery.load_model("tiny", device="cuda", dtype=torch.bfloat16)
    surgery.apply(model, mixed_plan(model, "threshold"))
    grid = VideoGrid(8, 16, 16)
    inputs = {k: v.cuda() for k, v in model_inputs(model, grid, batch=1).items()}
    inputs["hidden_states"] = inputs["hidden_states"].bfloat16()
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].bfloat16()
    with torch.no_grad():
        eager = model(**inputs).sample.float()
        if mode == "blocks":
            model.compile_repeated_blocks(fullgraph=True)
            compiled = model(**inputs).sample.float()
        else:
            compiled = torch.compile(model)(**inputs).sample.float()
    assert ((compiled - eager).norm() / eager.norm()).item() <= 2e-2
