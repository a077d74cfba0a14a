"""How far a student's output is from its teacher's: relative L2, PSNR and SSIM."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def relative_l2(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """‖estimate − reference‖ / ‖reference‖ over the whole tensor, in fp32."""
    reference = reference.float()
    return float((estimate.float() - reference).norm() / reference.norm().clamp_min(1e-30))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of videos in [0, 1]."""
    mse = float(F.mse_loss(a.float(), b.float()))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> float:
    """Mean SSIM (Wang et al. 2004, uniform window) over frames; videos [F, C, H, W] in [0, 1]."""
    window = min(window, a.shape[-1], a.shape[-2])
    c1, c2 = 0.01**2, 0.03**2

    def local_mean(x):
        return F.avg_pool2d(x, window, stride=1)

    a, b = a.float(), b.float()
    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a = local_mean(a * a) - mu_a**2
    var_b = local_mean(b * b) - mu_b**2
    cov = local_mean(a * b) - mu_a * mu_b
    score = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(score.mean())
