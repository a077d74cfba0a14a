"""Recipes: TOML files naming the plan (or the budget to plan for), the data and the two stages.

Shipped recipes live in the repository's `recipes/` folder, installed as the package data of
`surgery.recipes`; `--recipe NAME` finds one of those, `--recipe path.toml` reads a user's. Every key is typed: a typo or a wrong type is a
one-line error naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from . import config as typed
from .errors import SurgeryError

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib


def _at_least(settings, **bounds: tuple[float, bool]) -> None:
    """bounds: field → (lowest value, whether the lowest itself is excluded); the first field out of
    bounds is a ValueError naming it."""
    for name, (low, strict) in bounds.items():
        value = getattr(settings, name)
        if value < low or (strict and value == low):
            raise ValueError(f"{name} must be {'>' if strict else '≥'} {low:g}, got {value!r}")


@dataclass(frozen=True)
class PlanSection:
    budget: float = 0.6  # attention FLOPs as a fraction of dense, for the planner
    variants: list[str] | None = None  # candidate variants; None = all registered
    keep_full: list[int] = field(default_factory=list)
    samples: int = 4  # calibration inputs
    path: str | None = None  # an existing plan JSON instead of planning
    # Measure learned candidates (feature maps) after this recipe's stage 1, not at their init.
    distill_errors: bool = True
    # Per variant, settings laid over each of its planner candidates, e.g. the feature map that Attention
    # Surgery used: { hybrid_selected = { kind = "polynomial" } }.
    params_by_variant: dict[str, dict] = field(default_factory=dict)
    # The first `dense_steps` of `sampling_steps` sampling steps keep the model's dense attention; the budget
    # counts them as dense (surgery.planner.make_plans).
    dense_steps: int = 0
    sampling_steps: int = 50

    def __post_init__(self):
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        _at_least(self, samples=(1, False), dense_steps=(0, False), sampling_steps=(2, False))
        if self.dense_steps >= self.sampling_steps:
            raise ValueError(
                f"dense_steps must be below sampling_steps ({self.sampling_steps}), got {self.dense_steps}")
        if any(layer < 0 for layer in self.keep_full):
            raise ValueError(f"keep_full holds layer indices (≥ 0), got {self.keep_full}")
        from .variants import VARIANTS

        for name, params in self.params_by_variant.items():
            if name not in VARIANTS:
                raise ValueError(f"params_by_variant: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
            for candidate in VARIANTS[name].plan_candidates:  # each candidate as the planner will build it
                VARIANTS[name].Config.from_dict({**candidate, **params}, where=f"plan.params_by_variant.{name}")


@dataclass(frozen=True)
class DataSection:
    # "noise": self-distillation inputs made from noise, timesteps and text embeddings (no data);
    # "dataset": a `datasets` folder (save_to_disk) with `latents` and `text_embeddings` columns;
    # "toy": the toy teacher's own kind of clips and captions (surgery.toy), for `--model toy`.
    source: Literal["noise", "dataset", "toy"] = "noise"
    path: str | None = None
    samples: int = 32  # size of the training set (source = "noise" or "toy")
    # Samples per step over all processes (the global batch): each of N processes takes batch_size / N,
    # so a run gives the same steps on any process count that divides it.
    batch_size: int = 1
    # Training noise levels t = shift·u / (1 + (shift − 1)·u), u uniform (surgery.data.StepSampler): 1 is
    # uniform; > 1 trains more at high noise, where samplers with Wan's shift spend their steps and where a
    # student's errors move a video's layout for good.
    timestep_shift: float = 1.0

    def __post_init__(self):
        if self.source == "dataset" and not self.path:
            raise ValueError("data.path is required when data.source = 'dataset'")
        _at_least(self, batch_size=(1, False), samples=(1, False), timestep_shift=(0, True))


@dataclass(frozen=True)
class StageSettings:
    """Optimiser settings of one training stage: AdamW with linear warmup, then cosine to 10% of lr."""

    steps: int = 100
    lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0

    def __post_init__(self):
        _at_least(self, steps=(0, False), lr=(0, True), weight_decay=(0, False), warmup_steps=(0, False),
                  grad_clip=(0, True))

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass(frozen=True)
class Stage1(StageSettings):
    """Attention transfer: new attention vs the teacher's attention output, L1 (value-based) loss.

    lr_by_variant: a peak lr per variant name, for plans that mix variants whose parameters want different
    steps: feature maps start at the identity and take large ones, VSA's zero-initialised gate (a dim → H·D
    projection) overshoots at them and makes its layer worse than no gate.
    """

    lr_by_variant: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        from .variants import VARIANTS

        for name, lr in self.lr_by_variant.items():
            if name not in VARIANTS:
                raise ValueError(f"lr_by_variant: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
            if lr <= 0:
                raise ValueError(f"lr_by_variant.{name} must be > 0, got {lr}")

    def lr_scale(self, variant: str) -> float:
        """The factor on the schedule's lr for parameters of `variant`."""
        return self.lr_by_variant.get(variant, self.lr) / self.lr


@dataclass(frozen=True)
class SparsityAnneal:
    """VSA's schedule: start dense, raise sparsity by `step` every `every` steps, up to the plan's."""

    start: float = 0.0
    step: float = 0.1
    every: int = 10

    def __post_init__(self):
        _at_least(self, start=(0, False), step=(0, True), every=(1, False))
        if self.start > 1:
            raise ValueError(f"start is a sparsity, at most 1, got {self.start}")


@dataclass(frozen=True)
class Stage2(StageSettings):
    """Fine-tuning of the whole student end-to-end."""

    steps: int = 50
    lr: float = 1e-4
    mode: Literal["lora", "full"] = "lora"
    # Loss weights: velocity distillation against the teacher on the same noisy input, and
    # flow matching against the data's clean latents (needs data.source = "dataset").
    distill_weight: float = 1.0
    flow_weight: float = 0.0
    lora_rank: int = 8
    lora_alpha: int = 16
    # LoRA targets, as regexes over module names: self-attention projections and the FFN by default.
    lora_targets: str = r".*blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)|ffn\.net\.(0\.proj|2))"
    sparsity_anneal: SparsityAnneal | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.distill_weight < 0 or self.flow_weight < 0 or self.distill_weight + self.flow_weight == 0:
            raise ValueError("stage2 needs a positive distill_weight or flow_weight")
        _at_least(self, lora_rank=(1, False), lora_alpha=(0, True))


@dataclass(frozen=True)
class TrainSection:
    seed: int = 0
    checkpoint_every: int = 25
    mixed_precision: Literal["no", "bf16"] = "bf16"  # bf16 autocast applies on GPU only
    gradient_checkpointing: bool = False

    def __post_init__(self):
        _at_least(self, checkpoint_every=(1, False))


@dataclass(frozen=True)
class ParallelSection:
    """How a multi-process launch (`accelerate launch`, `torchrun`) splits the work; one process ignores it."""

    # "ddp": every process holds the whole student and teacher, gradients are averaged;
    # "fsdp": both are sharded by transformer block (FSDP2 `fully_shard`), the teacher frozen.
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # fsdp: "full" frees a block's gathered weights after its forward and gathers them again for the
    # backward (least memory); "grad_op" keeps them until the backward (less communication).
    sharding: Literal["full", "grad_op"] = "full"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    plan: PlanSection = field(default_factory=PlanSection)
    data: DataSection = field(default_factory=DataSection)
    stage1: Stage1 = field(default_factory=Stage1)
    stage2: Stage2 = field(default_factory=Stage2)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(typed.to_dict(self))

    def override(self, assignments: list[str]) -> "Recipe":
        """Apply `section.key=value` overrides (value in TOML syntax, e.g. stage1.steps=20)."""
        data = self.to_dict()
        for assignment in assignments:
            key, sep, raw = assignment.partition("=")
            if not sep:
                raise SurgeryError(f"--set takes section.key=value, got {assignment!r}")
            try:
                value = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                value = raw  # a bare word is a string
            *path, last = key.strip().split(".")
            node = data
            for part in path:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise SurgeryError(f"--set {key}: {part} is not a section")
            node[last] = value
        return parse(data, f"recipe {self.name}")


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def parse(data: dict, where: str) -> Recipe:
    return typed.from_dict(Recipe, data, where)


def shipped_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("surgery.recipes").iterdir() if p.name.endswith(".toml"))


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """A shipped recipe by name (`hybrid`), or a TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise SurgeryError(f"recipe file {path} does not exist")
        text, where = path.read_text(), str(path)
    else:
        source = resources.files("surgery.recipes") / f"{name_or_path}.toml"
        if not source.is_file():
            raise SurgeryError(f"no recipe named {name_or_path!r} (shipped: {', '.join(shipped_recipes())})")
        text, where = source.read_text(), f"recipe {name_or_path}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SurgeryError(f"{where} is not valid TOML: {e}") from None
    recipe = parse(data, where)
    return recipe.override(overrides) if overrides else recipe


def replace(recipe: Recipe, **sections) -> Recipe:
    return dataclasses.replace(recipe, **sections)
