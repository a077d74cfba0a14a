"""How much each candidate attention variant hurts each layer: the planner's error table.

The frozen model runs on a few calibration inputs; at every self-attention layer each candidate
sees the layer's own q, k, v and input, and its output is compared with full attention:
error = ‖ŷ − y‖ / ‖y‖ (relative L2 over the whole output), averaged over inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .capture import tap_self_attention
from .errors import SurgeryError
from .grid import VideoGrid
from .metrics import relative_l2
from .model import conditioner, image_embeddings, is_toy
from .variants import VARIANTS, AttentionVariant, VariantConfig
from .wan import latent_channels


@dataclass(frozen=True)
class Candidate:
    variant: str
    config: VariantConfig

    def label(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items() if v is not None)
        return f"{self.variant}({params})" if params else self.variant


def default_candidates(variants: list[str] | None = None,
                       params_by_variant: dict[str, dict] | None = None) -> list[Candidate]:
    """Every registered variant's `plan_candidates` settings, each with `params_by_variant[variant]` laid over it
    (a recipe's `[plan] params_by_variant`); `full` is always a candidate."""
    names = list(VARIANTS) if variants is None else ["full", *(v for v in variants if v != "full")]
    overrides = params_by_variant or {}
    unknown = [n for n in [*names, *overrides] if n not in VARIANTS]
    if unknown:
        raise SurgeryError(f"unknown attention variant {unknown[0]!r} (known: {', '.join(VARIANTS)})")
    return [
        Candidate(name, VARIANTS[name].Config.from_dict({**params, **overrides.get(name, {})}, where=name))
        for name in names
        for params in VARIANTS[name].plan_candidates
    ]


def calibration_inputs(
    model, grid: VideoGrid, samples: int, seed: int, text_tokens: int, dataset_path: str | None = None,
    band: tuple[float, float] = (0.0, 1.0), image_tokens: int | None = None,
) -> list[dict]:
    """`samples` model inputs at `grid`, with timesteps spread evenly over `band` (fractions of 1000; one expert
    of two is calibrated where it serves). Image-to-video models get the clip's first frame as their image
    (a random one without data) and, with image_dim, random CLIP image tokens.

    Without a dataset: random latents and random text embeddings (a random-weight model has no data
    distribution to prefer), except for the toy teacher, which gets clips and captions of the kind
    it was trained on (data source "toy"). With `dataset_path` (a `datasets.save_to_disk` folder with
    `latents` and `text_embeddings` columns, as for distillation): its rows in order. Rows are
    noised to each timestep by flow matching, x_t = (1 − t)·x0 + t·ε.
    """
    g = torch.Generator().manual_seed(seed)
    pt, ph, pw = model.config.patch_size
    shape = (1, latent_channels(dict(model.config)), grid.frames * pt, grid.height * ph, grid.width * pw)
    condition = conditioner(dict(model.config))
    rows = None
    if dataset_path is not None or is_toy(dict(model.config)):
        from .recipe import DataSection
        from .data import build_dataset

        source = dict(source="dataset", path=dataset_path) if dataset_path else dict(source="toy", samples=samples)
        rows = build_dataset(DataSection(**source), dict(model.config), grid, text_tokens, seed, image_tokens)
    param = model.patch_embedding.weight  # the inputs' device and dtype (some modules stay fp32 in bf16 models)
    inputs = []
    for i in range(samples):
        t = band[0] + (band[1] - band[0]) * (i + 0.5) / samples
        image = image_embeddings(dict(model.config), image_tokens, 1, g)
        if rows is None:
            latents = torch.randn(*shape, generator=g)
            first_frame = torch.randn(*shape[:2], 1, *shape[3:], generator=g)
            text = torch.randn(1, text_tokens, model.config.text_dim, generator=g)
        else:
            row = rows[i % len(rows)]
            clean = row["latents"].float().unsqueeze(0)
            if tuple(clean.shape) != shape:
                raise SurgeryError(f"dataset latents have shape {tuple(clean.shape[1:])}, the grid needs {shape[1:]}")
            latents = (1 - t) * clean + t * torch.randn(*shape, generator=g)
            first_frame = clean[:, :, :1]
            text = row["text_embeddings"].float().unsqueeze(0)
            if "image_embeddings" in row:
                image = row["image_embeddings"].float().unsqueeze(0)
        inputs.append(
            dict(
                hidden_states=condition(latents, first_frame).to(param.device, param.dtype),
                timestep=torch.tensor([t * 1000.0], device=param.device),
                encoder_hidden_states=text.to(param.device, param.dtype),
                encoder_hidden_states_image=None if image is None else image.to(param.device, param.dtype),
            )
        )
    return inputs


@dataclass
class ErrorTable:
    candidates: list[Candidate]  # column order
    errors: list[list[float]]  # [layer][candidate] mean relative L2 error
    configs: list[list[VariantConfig]]  # [layer][candidate] config with data-dependent costs observed
    method: str = "each candidate as built: learned feature maps at their init"
    # (layer, candidate) → trained parameters of candidates measured after training (name → tensor,
    # as in the candidate's processor), and their training loss at the start and the end.
    trained: dict[tuple[int, int], dict[str, torch.Tensor]] = field(default_factory=dict)
    losses: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    # Where `errors` were measured after training: every candidate's error as built, and the processors
    # measured ([layer][candidate]), so that a plan from either table can be run whole
    # (`trajectories.processors_error`).
    built_errors: list[list[float]] | None = None
    modules: dict[int, list[AttentionVariant]] = field(default_factory=dict, repr=False)


def build_candidates(model, layer: int, candidates: list[Candidate], seed: int) -> list[AttentionVariant]:
    """Every candidate's processor for `layer`, from a seeded init: the same for every run of the planner."""
    torch.manual_seed(seed * 1009 + layer)
    attn = model.blocks[layer].attn1
    return [VARIANTS[c.variant].from_dense(attn, c.config, layer_index=layer) for c in candidates]


@torch.no_grad()
def measure_errors(
    model,
    inputs: list[dict],
    candidates: list[Candidate],
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    modules: dict[int, list[AttentionVariant]] | None = None,
) -> ErrorTable:
    """Run `model` on each input; at each layer evaluate every candidate on the layer's q, k, v.

    modules: the candidates' processors per layer (e.g. trained ones); by default `build_candidates`'.
    """
    num_layers = len(model.blocks)
    modules = dict(modules or {})
    sums = [[0.0] * len(candidates) for _ in range(num_layers)]

    def evaluate(layer, q, k, v, x, y, grid):
        if layer not in modules:
            modules[layer] = build_candidates(model, layer, candidates, seed)
        for j, module in enumerate(modules[layer]):
            sums[layer][j] += relative_l2(module.attend(q, k, v, grid, x), y)

    with tap_self_attention(model, evaluate):
        for i, model_input in enumerate(inputs):
            model(**model_input)
            if progress:
                progress(i + 1, len(inputs))
    errors = [[s / len(inputs) for s in row] for row in sums]
    configs = [[m.observed_config() for m in modules[layer]] for layer in range(num_layers)]
    return ErrorTable(candidates, errors, configs)
