"""`apply(model, plan)`: swap self-attention processors for attention variants, in one call.

Like torchao's `quantize_(model, config, filter_fn)` and peft's `inject_adapter`: everything is
checked and every new processor is built before the first one is set, so bad input never leaves a
half-converted model. Cross-attention (`attn2`) is never touched.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from torch import nn

from .errors import PlanError
from .grid import ForwardContext
from .plan import LayerChoice, Plan
from .variants import VARIANTS, AttentionVariant, VariantConfig
from .wan import fingerprint, layer_index, self_attention_fqn

FilterFn = Callable[[nn.Module, str], bool]


def forward_context(model) -> ForwardContext:
    """The model's shared `ForwardContext` (grid, dense steps), installed as a forward pre-hook the first time."""
    ctx = getattr(model, "_vsurgery_forward_context", None)
    if ctx is None:
        ctx = ForwardContext(model.config.patch_size)
        model.register_forward_pre_hook(ctx, with_kwargs=True)
        model._vsurgery_forward_context = ctx
    return ctx


def _plan_for_config(model, config: VariantConfig, filter_fn: FilterFn | None) -> Plan:
    names = [name for name, cls in VARIANTS.items() if type(config) is cls.Config]
    if not names:
        raise PlanError(f"{type(config).__name__} is not the config of a registered variant")
    layers = {
        fqn: LayerChoice(names[0], config)
        for fqn, module in self_attention_modules(model).items()
        if filter_fn is None or filter_fn(module, fqn)
    }
    if not layers:
        raise PlanError("filter_fn matched no self-attention layer")
    return Plan("", fingerprint(model.config), len(model.blocks), layers)


def self_attention_modules(model) -> dict[str, nn.Module]:
    """`blocks.N.attn1` → the WanAttention module, for every block."""
    return {self_attention_fqn(i): block.attn1 for i, block in enumerate(model.blocks)}


def check_plan(model, plan: Plan | VariantConfig | str | Path, filter_fn: FilterFn | None = None) -> Plan:
    """The plan `apply` would follow on `model`, checked against it; raises PlanError, changes nothing."""
    if isinstance(plan, (str, Path)):
        plan = Plan.load(plan)
    elif isinstance(plan, VariantConfig):
        plan = _plan_for_config(model, plan, filter_fn)
    elif filter_fn is not None:
        plan = dataclasses.replace(
            plan, layers={f: c for f, c in plan.layers.items() if filter_fn(model.get_submodule(f), f)})
    if plan.num_layers != len(model.blocks):
        raise PlanError(f"the plan is for a model with {plan.num_layers} layers; this one has {len(model.blocks)}")
    model_print = fingerprint(model.config)
    if plan.fingerprint != model_print:
        raise PlanError(
            f"the plan was made for model config {plan.fingerprint} ({plan.model or 'unnamed'}); "
            f"this model's config is {model_print}"
        )
    targets = self_attention_modules(model)
    unknown = [fqn for fqn in plan.layers if fqn not in targets]
    if unknown:
        raise PlanError(f"plan layer {unknown[0]!r} is not a self-attention layer of this model")
    if plan.stage1:
        _check_stage1_weights(plan, targets)
    return plan


def _check_stage1_weights(plan: Plan, targets: dict[str, nn.Module]) -> None:
    """Every stage-1 tensor of the plan is a parameter, of the same shape, of its layer's planned processor."""
    expected = {}
    for fqn in {name.split(".processor.")[0] for name in plan.stage1}:
        choice = plan.layers.get(fqn)
        if choice is not None:
            processor = VARIANTS[choice.variant].from_dense(targets[fqn], choice.config, layer_index(fqn))
            expected.update({f"{fqn}.processor.{n}": p.shape for n, p in processor.named_parameters()})
    for name, tensor in plan.stage1.items():
        if expected.get(name) != tensor.shape:
            raise PlanError(f"the plan's stage-1 weight {name} is not a parameter of its planned layer "
                            f"(or has another shape)")


def apply(model, plan: Plan | VariantConfig | str | Path, filter_fn: FilterFn | None = None):
    """Replace self-attention in `model` (a `WanTransformer3DModel`) according to `plan`, in place.

    plan: a `Plan`, a path to a plan JSON, or a single variant config for every layer that
    `filter_fn(module, fqn)` accepts. A plan's `dense_boundary` holds for the whole model: at timesteps at or
    above it every converted layer runs dense attention. Returns the model.
    """
    plan = check_plan(model, plan, filter_fn)
    targets = self_attention_modules(model)
    processors: dict[str, AttentionVariant] = {
        fqn: VARIANTS[choice.variant].from_dense(targets[fqn], choice.config, layer_index(fqn))
        for fqn, choice in plan.layers.items()
    }
    install_processors(model, processors)
    forward_context(model).dense_boundary = plan.dense_boundary
    return model


def install_processors(model, processors: dict) -> dict:
    """Set each `blocks.N.attn1` of `processors` to its processor (variants share the model's grid recorder;
    any other diffusers processor is set as it is). Returns the processors they replace, to put back later."""
    ctx = forward_context(model)
    targets = self_attention_modules(model)
    replaced = {}
    for fqn, processor in processors.items():
        if isinstance(processor, AttentionVariant):
            processor.forward_context = ctx
            # A model under context parallelism (diffusers' enable_parallelism) gives new processors its config too.
            processor._parallel_config = getattr(model, "_parallel_config", None)
        replaced[fqn] = targets[fqn].processor
        targets[fqn].set_processor(processor)
    return replaced


def variant_processors(model) -> dict[str, AttentionVariant]:
    """`blocks.N.attn1` → its variant processor, for the layers that `apply` converted."""
    return {
        fqn: attn.processor
        for fqn, attn in self_attention_modules(model).items()
        if isinstance(attn.processor, AttentionVariant)
    }


def set_backend(model, backend: str) -> None:
    """"auto" runs each variant's kernel on CUDA where it has one; "torch" forces the references."""
    from .variants.base import BACKENDS

    if backend not in BACKENDS:
        raise PlanError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    for processor in variant_processors(model).values():
        processor.backend = backend
