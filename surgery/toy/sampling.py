"""The toy's text-to-video sampler: its captions, its shifted Euler schedule and guidance."""

from __future__ import annotations

import torch

from ..grid import video_grid
from ..sampling import euler_sample, shifted_sigmas
from .captions import CaptionEncoder
from .codec import decode, with_positions
from .spec import FRAMES, GUIDANCE_SCALE, HEIGHT, LATENT_CHANNELS, LATENT_SCALE, SAMPLE_STEPS, SHIFT, WIDTH


@torch.no_grad()
def sample(model, caption_encoder: CaptionEncoder, prompt: str, seed: int = 0, steps: int = SAMPLE_STEPS,
           guidance_scale: float = GUIDANCE_SCALE, shift: float = SHIFT, frames: int = FRAMES,
           height: int = HEIGHT, width: int = WIDTH, on_step=None) -> torch.Tensor:
    """Generate a clip for `prompt`: uint8 video [F, H, W, 3], deterministic per seed (on one device).

    Euler steps on rectified flow from σ = 1 (noise) to 0 on Wan's shifted schedule
    (`surgery.sampling.shifted_sigmas`). Guidance mixes the prompt's velocity with the empty
    prompt's: v = v(∅) + guidance_scale·(v(prompt) − v(∅)). on_step() runs after every step (progress).
    """
    video_grid(frames, height, width, patch_size=model.config.patch_size, vae_scale=LATENT_SCALE)  # checks sizes
    device, dtype = model.device, model.dtype
    text = caption_encoder([prompt, ""]).to(device, dtype)
    _, sh, sw = LATENT_SCALE
    noise_shape = (1, LATENT_CHANNELS, frames, height // sh, width // sw)
    noise = torch.randn(noise_shape, generator=torch.Generator().manual_seed(seed)).to(device)
    x, _ = euler_sample(model, noise, text[:1], shifted_sigmas(steps, shift), condition=with_positions,
                        uncond_text=text[1:], guidance_scale=guidance_scale, on_step=on_step)
    return decode(x)[0]
