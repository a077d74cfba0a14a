"""Sampling the teacher and a student from the same starts: the noise, text and image a comparison draws, Euler
sampling on Wan's σ schedule, and the final latents' error of a model with other processors installed. Shared by
`evaluate.compare` and the planner's whole-student check."""

from __future__ import annotations

import torch

from .errors import SurgeryError
from .grid import VideoGrid
from .metrics import relative_l2
from .model import conditioner, default_text_tokens, image_embeddings, is_toy, model_kind
from .sampling import FLOW_SHIFT, euler_sample
from .swap import install_processors
from .wan import latent_channels


def sample_latents(model, noise, text, steps: int, reference=None, on_step=None, image=None, image_embeds=None,
                   first_frame=None):
    """Euler flow-matching sampling from `noise` on the σ schedule of Wan's FlowMatchEulerDiscreteScheduler;
    with `reference`, also the reference's velocity error per step along `model`'s trajectory. Image-to-video:
    `image` the image's latents [B, C, F', H, W] (surgery.model.conditioner), `image_embeds` its CLIP tokens;
    Wan2.2 TI2V: `first_frame` the image's latents [B, C, 1, H, W] (surgery.sampling.euler_sample).
    Returns (latents, [errors])."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    scheduler.set_timesteps(steps)
    condition = conditioner(dict(model.config))
    return euler_sample(model, noise, text, scheduler.sigmas.tolist(), condition=lambda x: condition(x, image),
                        reference=reference, on_step=on_step, extra={"encoder_hidden_states_image": image_embeds},
                        first_frame=first_frame, patch_size=tuple(model.config.patch_size))


def sampling_starts(teacher, teacher_spec: str, grid: VideoGrid, samples: int, seed: int,
                    prompts: list[str] | None = None, picture=None) -> tuple[list[dict], list[str] | None]:
    """What a comparison samples from, drawn from `seed` on the teacher's device: per sample the noise, the text
    (the toy's captions, `prompts` or drawn; random embeddings otherwise) and an image-to-video teacher's image
    (`picture`: its latents and CLIP tokens, as `evaluate.encode_image` makes them; else a random one), as
    `sample_latents` keywords. Returns (starts, the toy's prompts)."""
    device = next(teacher.parameters()).device
    pt, ph, pw = teacher.config.patch_size
    g = torch.Generator().manual_seed(seed)
    toy_text = None
    if is_toy(dict(teacher.config)):
        # The toy has a text encoder: its own captions, not random embeddings it never saw.
        from . import toy

        prompts = prompts or toy.sample_clips(samples, toy.clip_generator(seed, 0)).captions()
        toy_text = toy.caption_embeddings(prompts)
        samples = len(prompts)
    elif prompts is not None:
        raise SurgeryError(f"{teacher_spec} has no caption encoder here: prompts apply to the toy teacher only")
    config, kind = dict(teacher.config), model_kind(teacher_spec)
    starts = []
    for i in range(samples):
        noise = torch.randn(1, latent_channels(config), grid.frames * pt, grid.height * ph, grid.width * pw,
                            generator=g)
        if toy_text is None:
            text = torch.randn(1, default_text_tokens(teacher_spec), teacher.config.text_dim, generator=g)
        else:
            text = toy_text[i : i + 1]
        image_latents = image_embeds = first_frame = None
        if picture is not None:
            image_latents, image_embeds = picture
            first_frame = image_latents[:, :, :1] if kind.expand_timesteps else None
            image_latents = None if kind.expand_timesteps else image_latents
        elif kind.image == "required":
            # Image-to-video: a random first-frame latent and CLIP tokens, as text embeddings are random.
            image_latents = torch.randn(*noise.shape[:2], 1, *noise.shape[3:], generator=g).to(device)
            image_embeds = image_embeddings(config, kind.image_tokens, 1, g)
            image_embeds = None if image_embeds is None else image_embeds.to(device)
        starts.append(dict(noise=noise.to(device), text=text.to(device), image=image_latents,
                           image_embeds=image_embeds, first_frame=first_frame))
    return starts, prompts


def final_latents(model, starts: list[dict], steps: int) -> list[torch.Tensor]:
    """`model`'s samples (on the CPU) from each of `starts` (`sampling_starts`), `steps` Euler steps each."""
    return [sample_latents(model, steps=steps, **start)[0].cpu() for start in starts]


def processors_error(model, starts: list[dict], steps: int, reference: list[torch.Tensor], processors: dict) -> float:
    """Mean relative error of the final latents `model` samples with `processors` installed (fqn → processor)
    against `reference` (its `final_latents` as it is); the model's own processors are put back."""
    replaced = install_processors(model, processors)
    try:
        latents = final_latents(model, starts, steps)
    finally:
        install_processors(model, replaced)
    return sum(relative_l2(z, r) for z, r in zip(latents, reference)) / len(latents)
