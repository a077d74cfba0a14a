"""Stage 1's step: attention transfer inside one teacher forward (Attention Surgery's value-based distillation).

Shared by `distill` (one trainee per converted layer) and the planner's distillation-aware errors
(every learned candidate of every layer, all on the same teacher activations).
"""

from __future__ import annotations

import torch

from ..capture import tap_self_attention


def attention_transfer_fn(teacher, trainees: dict[int, list[torch.nn.Module]], sampler, device, dtype):
    """transfer(i): one teacher forward on step i's batch whose taps train, at every listed layer, each of
    its trainees (variant processors) on the layer's own q, k, v and input against its output y, under
    ‖y − ŷ‖₁ (value-based loss). Every trainee of a layer sees the same teacher activations.
    Returns ({layer: [loss per trainee]}, {layer: uniform attention's loss}, samples in the batch)."""

    def transfer(step_index: int) -> tuple[dict[int, list[float]], dict[int, float], int]:
        batch = sampler.batch(step_index, device, dtype)
        losses: dict[int, list[float]] = {}
        uniform: dict[int, float] = {}

        def train_layer(layer, q, k, v, x, y, grid):
            losses[layer] = []
            for trainee in trainees[layer]:
                with torch.enable_grad():
                    out = trainee.attend(q.detach(), k.detach(), v.detach(), grid, x.detach())
                    loss = (out.float() - y.detach().float()).abs().mean()  # value-based L1 loss
                    loss.backward()
                losses[layer].append(loss.item())
            # The same loss for uniform attention (every query gets the mean value): the yardstick a
            # student has to beat, since any attention pattern is a weighted mean of the values.
            uniform[layer] = (v.float().mean(1, keepdim=True) - y.float()).abs().mean().item()

        with torch.no_grad(), tap_self_attention(teacher, train_layer, layers=set(trainees)):
            teacher(hidden_states=batch.inputs, timestep=batch.timestep, encoder_hidden_states=batch.text,
                    encoder_hidden_states_image=batch.image)
        return losses, uniform, batch.inputs.shape[0]

    return transfer


def loss_ends(values: list[float]) -> tuple[float, float]:
    """A loss curve's start and end, each the mean over a tenth of the steps (at least one), since single
    steps differ by their noise levels."""
    tenth = max(1, len(values) // 10)
    return sum(values[:tenth]) / tenth, sum(values[-tenth:]) / tenth
