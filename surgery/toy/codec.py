"""The toy's codec (no VAE): pixels ↔ latents by a 2×2 space-to-depth, and the position channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import SurgeryError
from .spec import LATENT_SCALE

def encode(video: torch.Tensor) -> torch.Tensor:
    """uint8 video [B, F, H, W, 3] → latents [B, 12, F, H/2, W/2] in [-1, 1] (float32)."""
    b, f, h, w, _ = video.shape
    _, sh, sw = LATENT_SCALE
    if h % sh or w % sw:
        raise SurgeryError(f"the toy codec needs height and width divisible by {sh}, got {h}×{w}")
    x = video.permute(0, 1, 4, 2, 3).reshape(b * f, 3, h, w).float() / 127.5 - 1
    x = F.pixel_unshuffle(x, sh)  # [B·F, 12, H/2, W/2], channel = rgb·4 + dy·2 + dx
    return x.unflatten(0, (b, f)).transpose(1, 2)


def with_positions(noisy: torch.Tensor) -> torch.Tensor:
    """The toy transformer's input: noisy latents [B, 12, F, h, w] and the x and y coordinate of
    every latent pixel, from −1 to 1 across the frame: [B, 14, F, h, w]."""
    b, _, f, h, w = noisy.shape
    y = torch.linspace(-1, 1, h, device=noisy.device, dtype=noisy.dtype)[:, None].expand(h, w)
    x = torch.linspace(-1, 1, w, device=noisy.device, dtype=noisy.dtype)[None, :].expand(h, w)
    coordinates = torch.stack([x, y])[None, :, None].expand(b, -1, f, -1, -1)
    return torch.cat([noisy, coordinates], 1)


def decode(latents: torch.Tensor) -> torch.Tensor:
    """latents [B, 12, F, H/2, W/2] → uint8 video [B, F, H, W, 3]; exact inverse of `encode`."""
    b, _, f, h, w = latents.shape
    x = F.pixel_shuffle(latents.transpose(1, 2).flatten(0, 1).float(), LATENT_SCALE[1])  # [B·F, 3, H, W]
    x = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.unflatten(0, (b, f)).permute(0, 1, 3, 4, 2)


def decode_unit(latents: torch.Tensor) -> torch.Tensor:
    """latents [B, 12, F, H/2, W/2] → video [B, F, 3, H, W] as floats in [0, 1] (for PSNR and SSIM)."""
    return decode(latents).permute(0, 1, 4, 2, 3).float() / 255
