"""The attention-variant contract.

A variant is a diffusers attention processor that is also an `nn.Module`: set on `blocks.N.attn1`,
its parameters (feature maps, gates) live at `blocks.N.attn1.processor.*`, so they train and save
with the model. It owns four things:

- `Config`: a frozen dataclass of its settings, validated on construction;
- `flops(config, grid, heads, head_dim)`: its cost model, pure arithmetic; the planner's only view;
- `attend_reference(q, k, v, grid, x)`: its math in plain PyTorch, the definition kernels must match;
- `attend_kernel(...)`: its fast path on CUDA, where it has one (`backend="torch"` forces the reference);
- `training_free`: whether it is usable as built, before any distillation (a plan of such variants can be
  exported and run without a distill run).

Its parameters are head-major along dim 0 ([H, …] or [H·D, …]): under context parallelism each process runs
the variant on its share of the heads with that slice of every parameter.

Everything else — projections, RMS norms, rotary embedding, output projection — is Wan's own
self-attention path, reproduced exactly in `forward`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import weakref
from typing import Any, ClassVar

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn

from .. import config as typed
from ..errors import SurgeryError
from ..grid import ForwardContext, VideoGrid

BACKENDS = ("auto", "torch")


def dense_attention_flops(tokens: int, heads: int, head_dim: int) -> float:
    """Matmul FLOPs of dense attention for one video: QKᵀ and PV, 2·S²·D each, per head."""
    return 4.0 * heads * tokens * tokens * head_dim


@dataclasses.dataclass(frozen=True)
class VariantConfig:
    """Base of every variant's settings. Subclasses add fields and check them in `__post_init__`."""

    def to_dict(self) -> dict[str, Any]:
        return typed.to_dict(self)

    @classmethod
    def from_dict(cls, params: dict[str, Any], *, where: str = "") -> "VariantConfig":
        """Build from JSON/TOML values; unknown keys and wrong types are one-line errors."""
        return typed.from_dict(cls, params, where or cls.__name__)


class AttentionVariant(nn.Module):
    """Base class of self-attention variants; see the module docstring for the contract."""

    name: ClassVar[str]
    Config: ClassVar[type[VariantConfig]]
    # Settings the planner tries for this variant (parameters for Config.from_dict).
    plan_candidates: ClassVar[tuple[dict, ...]] = ({},)
    # Whether the variant works as built, before any distillation: true when it has nothing to learn or
    # its parameters start where it is already the attention it stands for (VSA's zero gate: the fine
    # stage alone). False for learned feature maps, whose init is only a starting point: the planner
    # measures such a variant after stage 1, and quality sweeps give it no training-free student.
    training_free: ClassVar[bool] = True
    # Matches diffusers' processors, so `model.set_attention_backend(...)` keeps working.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, config: VariantConfig, *, heads: int, head_dim: int, dim: int, layer_index: int = 0):
        super().__init__()
        if not isinstance(config, self.Config):
            raise SurgeryError(f"{self.name} needs a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        self.heads = heads
        self.head_dim = head_dim
        self.dim = dim
        self.layer_index = layer_index
        self.backend = "auto"
        self.forward_context: ForwardContext | None = None
        # How compiled code finds this processor again (`variant_attention`). A CPU tensor, not an int: the traced
        # graph takes it as an input, so every block with the same kind of processor shares one compiled graph
        # (`compile_repeated_blocks`), where an int attribute is specialised on and recompiles block after block.
        # A plain attribute, not a buffer: it stays on the CPU when the model moves, so reading it never syncs.
        number = next(_PROCESSOR_IDS)
        self.live_id = torch.tensor(number)
        _LIVE_PROCESSORS[number] = self

    # ---- the contract ---------------------------------------------------------------------------
    @classmethod
    def flops(cls, config: VariantConfig, grid: VideoGrid, heads: int, head_dim: int) -> float:
        """FLOPs of one self-attention call for one video (batch 1), everything the variant computes."""
        raise NotImplementedError

    @classmethod
    def density(cls, config: VariantConfig, grid: VideoGrid) -> float:
        """Share of (query, key) pairs that get exact softmax attention, in [0, 1]."""
        raise NotImplementedError

    def attend_reference(self, q, k, v, grid: VideoGrid, x: torch.Tensor | None = None) -> torch.Tensor:
        """q, k, v: [B, S, H, D] after norms and RoPE, S = grid.tokens in raster order;
        x: [B, S, dim], the attention's input (for gates). Returns [B, S, H, D]."""
        raise NotImplementedError

    def observed_config(self) -> VariantConfig:
        """The config with data-dependent cost fields filled from the calls seen so far (the
        planner reads it after calibration); variants whose cost is fixed return their config."""
        return self.config

    attend_kernel = None  # set by variants that have a fused kernel; same signature as attend_reference

    # ---- shared machinery -----------------------------------------------------------------------
    @classmethod
    def from_dense(cls, attn: nn.Module, config: VariantConfig, layer_index: int = 0) -> "AttentionVariant":
        """Build the processor for a diffusers `WanAttention`, on its device and in its dtype."""
        weight = attn.to_q.weight
        variant = cls(
            config,
            heads=attn.heads,
            head_dim=attn.inner_dim // attn.heads,
            dim=attn.to_q.in_features,
            layer_index=layer_index,
        )
        return variant.to(device=weight.device, dtype=weight.dtype)

    def uses_kernel(self, q: torch.Tensor) -> bool:
        """Whether `attend` runs the kernel path on `q`: where there is one, on CUDA, unless backend="torch"."""
        return self.attend_kernel is not None and self.backend == "auto" and q.is_cuda

    def attend(self, q, k, v, grid: VideoGrid, x: torch.Tensor | None = None) -> torch.Tensor:
        if self.uses_kernel(q):
            if torch.compiler.is_compiling():
                # One opaque op for torch.compile: the kernels' launches, host syncs and autograd.Functions
                # stay out of the traced graph, so a compiled block has no graph break here.
                return torch.ops.vsurgery.variant_attention(
                    q, k, v, x, list(self.parameters()), list(grid.shape), self.live_id)
            return self.attend_kernel(q, k, v, grid, x)
        return self.attend_reference(q, k, v, grid, x)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        """diffusers' processor call: Wan's self-attention path with `attend` as its core."""
        if encoder_hidden_states is not None or attention_mask is not None:
            raise SurgeryError(f"{self.name} replaces self-attention only; it was called as cross-attention")
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # [B, S, H, D]
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = apply_rotary_emb(query, *rotary_emb)
            key = apply_rotary_emb(key, *rotary_emb)
        if self.forward_context is not None and self.forward_context.dense:
            # A step the plan leaves dense (its first, highest-noise ones): the model's own attention, as
            # diffusers' processor runs it, context parallelism included.
            out = dispatch_attention_fn(query, key, value, backend=self._attention_backend,
                                        parallel_config=self._parallel_config)
        else:
            out = self._attend_planned(query, key, value, hidden_states)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def _attend_planned(self, query, key, value, hidden_states) -> torch.Tensor:
        """`attend` on the recorded grid, on this process's heads under context parallelism."""
        grid = self.forward_context.grid if self.forward_context is not None else None
        cp = self._parallel_config.context_parallel_config if self._parallel_config is not None else None
        tokens = query.shape[1] * (cp.ulysses_degree * cp.ring_degree if cp is not None else 1)
        if grid is None or grid.tokens != tokens:
            raise SurgeryError(
                f"{self.name} attention got {tokens} tokens but no matching video grid: "
                "apply variants with surgery.apply(), which records the grid at each forward"
            )
        if cp is not None:
            return self._attend_head_group(query, key, value, grid, hidden_states, cp)
        return self.attend(query, key, value, grid, x=hidden_states)

    def _attend_head_group(self, q, k, v, grid: VideoGrid, x, cp) -> torch.Tensor:
        """Ulysses context parallelism (diffusers' `enable_parallelism`): q, k, v, x come split along the
        sequence, [B, S/N, H, D]. diffusers exchanges heads for tokens only inside `dispatch_attention_fn`, which
        variants do not call, so it happens here with diffusers' own all-to-all: this process gets every token of
        its H/N heads, runs them through `attend_head_group`, and the output goes back to its tokens."""
        import torch.distributed._functional_collectives as funcol
        from diffusers.models.attention_dispatch import SeqAllToAllDim

        if cp.ring_degree > 1:
            raise SurgeryError(f"{self.name} runs under Ulysses context parallelism only, not ring attention")
        group, n = cp._ulysses_mesh.get_group(), cp.ulysses_degree
        q, k, v = (SeqAllToAllDim.apply(group, t, 2, 1) for t in (q, k, v))  # [B, S, H/N, D]
        x = funcol.all_gather_single(x.contiguous(), gather_dim=1, group=group)  # [B, S, dim], with autograd
        if isinstance(x, funcol.AsyncCollectiveTensor):
            x = x.wait()
        out = self.attend_head_group(q, k, v, grid, x, cp._ulysses_mesh.get_local_rank(), n)
        return SeqAllToAllDim.apply(group, out.contiguous(), 1, 2)  # [B, S/N, H, D]

    def attend_head_group(self, q, k, v, grid: VideoGrid, x, index: int, groups: int) -> torch.Tensor:
        """`attend` on the `index`-th of `groups` equal groups of heads alone: q, k, v [B, S, H/groups, D] of those
        heads, x [B, S, dim]; every parameter is sliced to those heads (head-major along dim 0). Returns
        [B, S, H/groups, D], those heads of what `attend` gives on all of them."""
        params = {}
        for name, p in self.named_parameters():
            if p.shape[0] % self.heads:
                raise SurgeryError(f"{self.name}: parameter {name} {tuple(p.shape)} is not head-major, so it cannot "
                                   "be split over context-parallel processes")
            size = p.shape[0] // groups
            params[f"variant.{name}"] = p.narrow(0, index * size, size)
        heads, self.heads = self.heads, self.heads // groups
        try:
            return torch.func.functional_call(_Attend(self), params, (q, k, v, grid, x))
        finally:
            self.heads = heads

    def extra_repr(self) -> str:
        return f"{self.config}, heads={self.heads}, head_dim={self.head_dim}, layer={self.layer_index}"


class _Attend(nn.Module):
    """`variant.attend` as a module's forward, so that `torch.func.functional_call` can run it on other parameters."""

    def __init__(self, variant: AttentionVariant):
        super().__init__()
        self.variant = variant

    def forward(self, q, k, v, grid, x):
        return self.variant.attend(q, k, v, grid, x)


def apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs, the same ops as diffusers' WanAttnProcessor."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


# ---- the kernel path as one custom op, for torch.compile ---------------------------------------------
# Processors are found by a number that the compiled graph takes as a CPU tensor input (ops take tensors and plain
# values only).
_LIVE_PROCESSORS: "weakref.WeakValueDictionary[int, AttentionVariant]" = weakref.WeakValueDictionary()
_PROCESSOR_IDS = itertools.count()


@torch.library.custom_op("vsurgery::variant_attention", mutates_args=())
def variant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor | None,
                      params: list[torch.Tensor], grid: list[int], processor: torch.Tensor) -> torch.Tensor:
    """`attend_kernel` of the live processor numbered `processor` (its `live_id`, a CPU scalar) on q, k, v
    [B, S, H, D] (x [B, S, dim]) at `grid`. `params` are the processor's parameters, passed so that autograd sees
    the output depend on them."""
    return _LIVE_PROCESSORS[int(processor)].attend_kernel(q, k, v, VideoGrid(*grid), x)


@variant_attention.register_fake
def _(q, k, v, x, params, grid, processor):
    return torch.empty_like(q)


def _setup_backward(ctx, inputs, output):
    q, k, v, x, params, grid, processor = inputs
    ctx.save_for_backward(q, k, v, x)
    ctx.needs = [t is not None and t.requires_grad for t in (q, k, v, x)]
    ctx.grid, ctx.processor = grid, processor


def _backward(ctx, grad_out):
    """Recompute the kernel path under autograd and take its gradients (the compiled forward keeps no graph):
    what gradient checkpointing costs, paid only by compiled training."""
    processor = _LIVE_PROCESSORS[int(ctx.processor)]
    inputs = [t.detach().requires_grad_(need) if t is not None else None for t, need in zip(ctx.saved_tensors, ctx.needs)]
    params = list(processor.parameters())  # the leaves attend_kernel reads, in the order they were passed
    with torch.enable_grad():
        out = processor.attend_kernel(*inputs[:3], VideoGrid(*ctx.grid), inputs[3])
        wanted = [t for t in [*inputs, *params] if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True) if wanted else ())
    input_grads = [next(grads) if t is not None and t.requires_grad else None for t in inputs]
    return (*input_grads, [next(grads) if p.requires_grad else None for p in params], None, None)


variant_attention.register_autograd(_backward, setup_context=_setup_backward)
