"""Does a model follow the toy's direction words? The shape tracked across frames, and its travel."""

from __future__ import annotations

import torch

from ..errors import SurgeryError
from .clips import caption
from .sampling import sample
from .spec import COLOURS, MOTIONS, SHAPES

# The axis (0 = x, 1 = y, y downwards) and sign of each translating direction.
TRAVEL_AXES = {"left to right": (0, 1), "right to left": (0, -1), "top to bottom": (1, 1), "bottom to top": (1, -1)}


def shape_track(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Find the shape in each frame of a uint8 video [F, H, W, 3]: backgrounds are muted greys and
    shapes saturated colours, so the shape is the pixels whose channels spread by more than 0.45 and
    by at least 3/4 of the frame's most saturated pixels' (the 99th percentile), which leaves out its
    fainter trail. Returns the centroids (x, y) in pixels [F, 2] (NaN in a frame with no such pixel)
    and the masks [F, H, W]."""
    v = video.float() / 255
    saturation = v.amax(-1) - v.amin(-1)  # [F, H, W]
    threshold = (0.75 * saturation.flatten(1).quantile(0.99, dim=1)).clamp(min=0.45)  # [F]
    masks = saturation > threshold[:, None, None]
    ys, xs = torch.meshgrid(torch.arange(video.shape[1]), torch.arange(video.shape[2]), indexing="ij")
    count = masks.sum((1, 2)).float()
    centres = torch.stack([(masks * xs).sum((1, 2)) / count, (masks * ys).sum((1, 2)) / count], 1)
    return centres, masks


def travel(video: torch.Tensor, direction: str) -> float:
    """How far the shape in a uint8 video [F, H, W, 3] went along `direction` (a key of TRAVEL_AXES),
    as a fraction of the frame: the mean centroid over the last quarter of the frames minus that over the
    first quarter. NaN when the shape is not found in those frames."""
    axis, sign = TRAVEL_AXES[direction]
    centres, _ = shape_track(video)
    quarter = max(1, len(centres) // 4)
    moved = centres[-quarter:, axis].mean() - centres[:quarter, axis].mean()
    return sign * moved.item() / video.shape[2 - axis]


TRANSLATIONS = [(motion, direction) for motion in ("moving", "bouncing") for direction in MOTIONS[motion]]


def direction_prompt(seed: int, motion: str, direction: str, avoid: frozenset[str] = frozenset()) -> str:
    """Seed i's prompt: colour i mod 6, shape i mod 5; where that caption is in `avoid` (e.g. captions a
    student was trained on), the next seed's colour and shape, and so on (all 30 pairs come round)."""
    for k in range(seed, seed + len(COLOURS) * len(SHAPES)):
        prompt = caption(list(COLOURS)[k % len(COLOURS)], SHAPES[k % len(SHAPES)], motion, direction)
        if prompt not in avoid:
            return prompt
    raise SurgeryError(f"every colour and shape of '{motion} {direction}' is a caption to avoid")


def direction_scores(model, encoder, seeds: int = 8, min_travel: float = 0.15,
                     avoid: frozenset[str] = frozenset(), **sample_kwargs) -> dict:
    """Does `model` follow the direction words? For every translating motion and direction, sample
    `seeds` clips (seed i: `direction_prompt`, colour i mod 6, shape i mod 5, skipping captions in
    `avoid`) and measure each one's `travel`; a clip follows its prompt when it went more than
    `min_travel` of the frame the prompt's way (a clip where the shape is not found does not). Rotation
    is not scored: on blurry samples the tracker cannot tell a turn from noise. Returns per "motion
    direction" the share that follows and the mean travel, and under "all" the share over every clip."""
    rows, hits = {}, []
    for motion, direction in TRANSLATIONS:
        prompts = [direction_prompt(seed, motion, direction, avoid) for seed in range(seeds)]
        moved = [travel(sample(model, encoder, prompt, seed=seed, **sample_kwargs).cpu(), direction)
                 for seed, prompt in enumerate(prompts)]
        follows = [m > min_travel for m in moved]  # NaN > x is False
        hits += follows
        found = [m for m in moved if m == m]
        rows[f"{motion} {direction}"] = dict(
            follows=sum(follows) / seeds, mean_travel=sum(found) / len(found) if found else float("nan"))
    rows["all"] = dict(follows=sum(hits) / len(hits))
    return rows
