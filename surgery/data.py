"""Training inputs through `datasets`, with a deterministic order and noise derived from (seed, step).

Three sources:
- "noise" (no data needed; self-distillation): each sample is a latent x0 ~ N(0, I) at the target
  grid and a text embedding ~ N(0, I). At every step a timestep t and noise ε are drawn and the
  models see x_t = (1 − t)·x0 + t·ε, Wan's flow-matching interpolation, so the teacher is queried at
  every noise level. Only the teacher's outputs are targets; x0 carries no meaning.
- "dataset": a folder written by `datasets.Dataset.save_to_disk` with columns `latents`
  ([C, F, H, W]) and `text_embeddings` ([L, text_dim]) — precomputed VAE latents and encoder outputs.
- "toy" (the toy teacher only): clips rendered by the generator it was trained on (`toy.toy_dataset`,
  the recipe seed's first `samples` clips at the grid's size) through its codec, and their captions
  through its caption encoder: the teacher's own input distribution, where "noise" gives it latents
  and text embeddings it never saw.

Everything random is derived from (seed, step), so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import SurgeryError
from .grid import VideoGrid
from .recipe import DataSection
from .model import image_embeddings
from .sampling import time_shift, unshift
from .wan import latent_channels


def build_dataset(data: DataSection, model_config: dict, grid: VideoGrid, text_tokens: int, seed: int,
                  image_tokens: int | None = None):
    """A `datasets.Dataset` with `latents` and `text_embeddings` columns, in torch format; for a model that
    attends to CLIP image tokens (Wan2.1 I2V), also `image_embeddings` (random ones for the "noise" source)."""
    import datasets

    if data.source == "dataset":
        try:
            dataset = datasets.load_from_disk(data.path)
        except (FileNotFoundError, ValueError) as e:
            raise SurgeryError(f"cannot load dataset {data.path}: {e}") from None
        missing = {"latents", "text_embeddings"} - set(dataset.column_names)
        if missing:
            raise SurgeryError(f"dataset {data.path} lacks column {sorted(missing)[0]!r}")
        return dataset.with_format("torch")

    pt, ph, pw = model_config["patch_size"]
    if data.source == "toy":
        return _toy_dataset(data.samples, model_config, (grid.frames * pt, grid.height * ph, grid.width * pw), seed)
    g = torch.Generator().manual_seed(seed)
    shape = (latent_channels(model_config), grid.frames * pt, grid.height * ph, grid.width * pw)
    latents = torch.randn(data.samples, *shape, generator=g)
    text = torch.randn(data.samples, text_tokens, model_config["text_dim"], generator=g)
    columns = {"latents": latents.numpy(), "text_embeddings": text.numpy()}
    images = image_embeddings(model_config, image_tokens, data.samples, g)
    if images is not None:
        columns["image_embeddings"] = images.numpy()
    return datasets.Dataset.from_dict(columns).with_format("torch")


def _toy_dataset(samples: int, model_config: dict, latent_size: tuple[int, int, int], seed: int):
    import datasets

    from . import toy
    from .model import is_toy

    if not is_toy(model_config):
        raise SurgeryError("data.source = 'toy' renders the toy teacher's clips; use it with --model toy")
    frames, height, width = (n * scale for n, scale in zip(latent_size, toy.LATENT_SCALE))
    clips = toy.toy_dataset(samples, seed, frames, height, width).with_format("torch", dtype=torch.uint8)[:]
    latents = toy.encode(clips["video"])  # [N, 12, F, H/2, W/2]
    text = toy.caption_embeddings(clips["caption"])
    dataset = datasets.Dataset.from_dict({"latents": latents.numpy(), "text_embeddings": text.numpy()})
    return dataset.with_format("torch")


@dataclass
class Batch:
    inputs: torch.Tensor  # [B, C_in, F, H, W] the transformer's: x_t, then any channels its conditioner appends
    timestep: torch.Tensor  # [B] t·1000
    text: torch.Tensor  # [B, L, text_dim]
    clean: torch.Tensor  # [B, C, F, H, W] x0
    noise: torch.Tensor  # [B, C, F, H, W] ε
    image: torch.Tensor | None = None  # [B, image_tokens, image_dim] CLIP image tokens (Wan2.1 I2V)


def split_batch(batch_size: int, world: int) -> int:
    """Each process's share of the global batch; a batch that does not split evenly is bad input, since
    the steps (and a checkpoint's continuation) are defined by the global batch."""
    if batch_size % world:
        raise SurgeryError(f"data.batch_size {batch_size} does not split over {world} processes: launch a process "
                           f"count that divides it (a run keeps the batch size it started with)")
    return batch_size // world


class StepSampler:
    """Batch for step s: the s-th slice of a per-epoch shuffled order; t and ε from (seed, stage, s, sample), t
    over `band` (fractions of 1000: one expert of two trains on the timesteps it serves): uniform, or with
    `timestep_shift` ≠ 1 uniform before the sampler's time shift (`sampling.time_shift`), so that > 1 spends
    more steps at high noise, where a video's layout and motion are decided and where a sampler with that
    shift spends its steps.

    batch_size is the global batch: with `world` processes, process `rank` takes its batch_size / world
    consecutive samples of it. Each sample's draws depend on its place in the global batch only, so the
    steps are the same whatever the process count that splits them."""

    def __init__(self, dataset, batch_size: int, seed: int, stage: int, rank: int = 0, world: int = 1,
                 condition=None, band: tuple[float, float] = (0.0, 1.0), timestep_shift: float = 1.0):
        self.dataset, self.batch_size, self.seed, self.stage = dataset, batch_size, seed, stage
        self.rank, self.local, self.band, self.shift = rank, split_batch(batch_size, world), band, timestep_shift
        # (x_t, first clean frame) → the transformer's input (surgery.model.conditioner); None: x_t as it is.
        self.condition = condition or (lambda noisy, image=None: noisy)

    def _positions(self, step: int) -> range:
        start = step * self.batch_size + self.rank * self.local
        return range(start, start + self.local)

    def _indices(self, step: int) -> list[int]:
        n = len(self.dataset)
        out = []
        for position in self._positions(step):
            epoch, offset = divmod(position, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            out.append(int(order[offset]))
        return out

    def batch(self, step: int, device, dtype) -> Batch:
        rows = self.dataset[self._indices(step)]
        clean = rows["latents"].to(torch.float32)
        low, high = (unshift(edge, self.shift) for edge in self.band)
        t, noise = [], []
        for position in self._positions(step):
            within = position - step * self.batch_size  # the sample's place in the global batch
            g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.stage) * 1_000_003 + step) * 1009 + within)
            t.append(low + (high - low) * torch.rand(1, generator=g))
            noise.append(torch.randn(clean.shape[1:], generator=g))
        t, noise = time_shift(torch.cat(t), self.shift), torch.stack(noise)
        sigma = t.view(-1, 1, 1, 1, 1)
        noisy = (1 - sigma) * clean + sigma * noise
        # Image-to-video: the clip's own first frame is the image it is conditioned on.
        image = rows["image_embeddings"].to(device, dtype) if "image_embeddings" in rows else None
        return Batch(
            self.condition(noisy, clean[:, :, :1]).to(device, dtype), (t * 1000).to(device),
            rows["text_embeddings"].to(device, dtype), clean.to(device, dtype), noise.to(device, dtype), image,
        )
