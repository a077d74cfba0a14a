"""Euler sampling of rectified flow, shared by `eval` (student vs teacher) and the toy's sampler.

x_t = (1 − σ)·x0 + σ·ε with the model predicting v = ε − x0 at timestep σ·1000 (Wan's convention);
each step moves x from σ to the next σ: x ← x + (σ_next − σ)·v, in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .errors import SurgeryError
from .metrics import relative_l2
from .wan import input_dtype


def time_shift(s, shift: float):
    """σ = shift·s / (1 + (shift − 1)·s): the time shift of Wan's FlowMatchEulerDiscreteScheduler, which maps
    uniform s ∈ [0, 1] to noise levels crowded toward σ = 1 for shift > 1 (1: unchanged)."""
    return shift * s / (1 + (shift - 1) * s)


def unshift(sigma, shift: float):
    """The s whose `time_shift` is σ."""
    return sigma / (shift - (shift - 1) * sigma)


FLOW_SHIFT = 3.0  # Wan2.1's flow shift at 480p: the schedule eval samples on and dense steps are counted on


def schedule_timesteps(steps: int, shift: float = FLOW_SHIFT) -> list[float]:
    """The timesteps (σ·1000, from high noise down) of `steps` steps of diffusers' FlowMatchEulerDiscreteScheduler
    at flow shift `shift`, the scheduler Wan's pipelines sample with."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.tolist()


def dense_boundary(dense_steps: int, steps: int, shift: float = FLOW_SHIFT) -> float:
    """The boundary ratio b that leaves exactly the first `dense_steps` of `steps` steps (flow shift `shift`) at
    timesteps ≥ b·1000: midway between the last of them and the next. On another number of steps the same b
    keeps about the same share of the steps dense."""
    if not 0 < dense_steps < steps:
        raise SurgeryError(
            f"dense steps must be between 1 and {steps - 1} of {steps} sampling steps, got {dense_steps}")
    timesteps = schedule_timesteps(steps, shift)
    return (timesteps[dense_steps - 1] + timesteps[dense_steps]) / 2000


@dataclass(frozen=True)
class DenseSteps:
    """The first `steps` of `of` sampling steps (flow shift `flow_shift`) keep the model's dense attention, the
    rest run a plan: how a budget over the sampling run splits between them."""

    steps: int
    of: int
    flow_shift: float = FLOW_SHIFT
    boundary: float = field(init=False)  # `dense_boundary`, computed (and the range checked) once

    def __post_init__(self):
        object.__setattr__(self, "boundary", dense_boundary(self.steps, self.of, self.flow_shift))

    @property
    def share(self) -> float:
        return self.steps / self.of

    def planned_budget(self, budget: float) -> float:
        """The cost ratio (of dense) left to each planned step by `budget` over the sampling run."""
        if budget <= self.share:
            raise SurgeryError(f"budget {budget:g} leaves nothing for the planned steps: {self.steps} dense steps of "
                               f"{self.of} already take {self.share:.4f} of the sampling run")
        return (budget - self.share) / (1 - self.share)

    def run_ratio(self, planned_ratio: float) -> float:
        """The sampling run's cost ratio when each planned step costs `planned_ratio` of dense."""
        return self.share + (1 - self.share) * planned_ratio


def shifted_sigmas(steps: int, shift: float) -> list[float]:
    """σ from 1 to 0 over `steps` steps: uniform s ∈ [1, 0] through `time_shift`, which spends more steps at
    high noise."""
    return time_shift(torch.linspace(1, 0, steps + 1), shift).tolist()


@torch.no_grad()
def euler_sample(
    model,
    noise: torch.Tensor,
    text: torch.Tensor,
    sigmas: Sequence[float],
    *,
    condition: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    uncond_text: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    reference=None,
    on_step: Callable[[], None] | None = None,
    extra: dict | None = None,
    first_frame: torch.Tensor | None = None,
    patch_size: tuple[int, int, int] = (1, 2, 2),
) -> tuple[torch.Tensor, list[float]]:
    """Sample from `noise` [B, C, F, H, W] along `sigmas` (σ_0 = 1 … σ_n = 0).

    text: [B, L, text_dim]; with `uncond_text` and guidance ≠ 1 both run in one batch and mix as
    v = v(∅) + guidance_scale·(v(text) − v(∅)). condition maps x_t to the transformer's input.
    With `reference` (a second model), also returns its velocity's relative error against
    `model`'s at every step, on `model`'s trajectory. on_step() runs after every step (progress).
    extra: more inputs of both models (CLIP image tokens `encoder_hidden_states_image` [B, N, image_dim]).
    first_frame: latents [B, C, 1, H, W] held as x's first frame, whose tokens (`patch_size` 1 in time) get timestep 0:
    Wan2.2 TI2V's image-to-video, as diffusers' pipeline runs it with expand_timesteps.
    Returns (x at σ = 0 in fp32, errors).
    """
    device, dtype = noise.device, input_dtype(model)
    guided = uncond_text is not None and guidance_scale != 1
    text = torch.cat([text, uncond_text]) if guided else text
    extra = {k: torch.cat([v, v]) if guided and v is not None else v for k, v in (extra or {}).items()}
    x = noise.float()
    errors = []
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        sigma, sigma_next = float(sigma), float(sigma_next)
        if first_frame is not None:
            x[:, :, :1] = first_frame
        inputs = condition(x.to(dtype))
        if guided:
            inputs = torch.cat([inputs, inputs])
        timestep = torch.full((inputs.shape[0],), sigma * 1000, device=device)
        if first_frame is not None:
            pt, ph, pw = patch_size
            per_token = torch.full((x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw), sigma * 1000, device=device)
            per_token[0] = 0
            timestep = per_token.flatten().expand(inputs.shape[0], -1)
        v = model(hidden_states=inputs, timestep=timestep, encoder_hidden_states=text, return_dict=False,
                  **extra)[0].float()
        if reference is not None:
            v_ref = reference(hidden_states=inputs, timestep=timestep, encoder_hidden_states=text,
                              return_dict=False, **extra)[0]
            errors.append(relative_l2(v_ref, v))
        if guided:
            v_text, v_uncond = v.chunk(2)
            v = v_uncond + guidance_scale * (v_text - v_uncond)
        x = x + (sigma_next - sigma) * v
        if on_step is not None:
            on_step()
    if first_frame is not None:
        x[:, :, :1] = first_frame
    return x, errors
