"""The toy's procedural clips: parameters drawn per seed, rendered as uint8 video, and captioned."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from .spec import COLOURS, DIRECTIONS, FRAMES, HEIGHT, MOTIONS, SHAPES, WIDTH

_BOUNCING, _ROTATING = list(MOTIONS).index("bouncing"), list(MOTIONS).index("rotating")
_RIGHT_TO_LEFT, _TOP_TO_BOTTOM, _BOTTOM_TO_TOP, _CLOCKWISE = (
    DIRECTIONS.index(d) for d in ("right to left", "top to bottom", "bottom to top", "clockwise")
)
_BACKGROUNDS = 4  # smooth noise, stripes, checker, gradient
TRAIL = ((6.0, 0.25), (3.0, 0.45))  # (frames behind, opacity) of the shape's fading copies, oldest first


def caption_vocabulary() -> list[str]:
    direction_words = [w for direction in DIRECTIONS for w in direction.split()]
    return list(dict.fromkeys(["a", "an", *COLOURS, *SHAPES, *MOTIONS, *direction_words]))


@dataclass
class ClipParams:
    """Everything that decides a batch of clips; every field has the batch as its first dimension.

    Positions and sizes are fractions of the frame, so one set of parameters renders at any size.
    """

    shape: torch.Tensor  # [B] index into SHAPES
    colour: torch.Tensor  # [B] index into COLOURS
    motion: torch.Tensor  # [B] index into MOTIONS
    direction: torch.Tensor  # [B] index into DIRECTIONS
    rgb: torch.Tensor  # [B, 3] the shape's colour, jittered around its name's
    size: torch.Tensor  # [B] radius, fraction of min(height, width)
    start: torch.Tensor  # [B, 2] centre (x, y) at the first frame, y downwards
    end: torch.Tensor  # [B, 2] centre at the last frame
    hop_height: torch.Tensor  # [B] bouncing: height of each hop
    hops: torch.Tensor  # [B] bouncing: hops over the clip
    angle: torch.Tensor  # [B] orientation at the first frame, radians
    spin: torch.Tensor  # [B] rotation over the clip, radians; positive is clockwise on screen
    background: torch.Tensor  # [B] index of the background kind
    background_colours: torch.Tensor  # [B, 2, 3] stripes, checker and gradient colours
    background_noise: torch.Tensor  # [B, 3, 5, 5] smooth-noise control points
    background_wave: torch.Tensor  # [B, 3] frequency (cycles per frame), angle, phase

    def to(self, device) -> "ClipParams":
        return ClipParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def captions(self) -> list[str]:
        motions, colours = list(MOTIONS), list(COLOURS)
        return [caption(colours[colour], SHAPES[shape], motions[motion], DIRECTIONS[direction])
                for shape, colour, motion, direction in zip(
                    self.shape.tolist(), self.colour.tolist(), self.motion.tolist(), self.direction.tolist())]


def caption(colour: str, shape: str, motion: str, direction: str) -> str:
    """ "a red square bouncing left to right": the caption of a clip, and the prompt that asks for one."""
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} {motion} {direction}"


def clip_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for batch `index` of stream `seed` (torch's CPU generator keeps only 32 bits of
    a seed, so the pair is hashed into 32 bits rather than packed into one integer)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))


def sample_clips(n: int, generator: torch.Generator) -> ClipParams:
    """Draw the parameters of `n` clips (on the CPU) from `generator`."""

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=generator)

    motion = torch.randint(len(MOTIONS), (n,), generator=generator)
    first_direction = torch.tensor([DIRECTIONS.index(m[0]) for m in MOTIONS.values()])[motion]
    direction_count = torch.tensor([len(m) for m in MOTIONS.values()])[motion]
    direction = first_direction + (uniform(n) * direction_count).long()
    rotating, bouncing = motion == _ROTATING, motion == _BOUNCING
    shape = (uniform(n) * torch.where(rotating, len(SHAPES) - 1, len(SHAPES))).long()
    colour = torch.randint(len(COLOURS), (n,), generator=generator)
    rgb = (torch.tensor(list(COLOURS.values()))[colour] + uniform(n, 3, low=-0.06, high=0.06)).clamp(0, 1)
    size = uniform(n, low=0.14, high=0.2)
    margin = size + 0.02

    # Translations run edge to edge (44–68% of the frame), at a random place across it: the caption
    # then decides where the shape starts as well as where it goes, which gives the direction words
    # a large, consistent effect on the clip (with starts anywhere, a small model ignored them).
    along_start = margin + uniform(n, high=0.06)
    along_end = 1 - margin - uniform(n, high=0.06)
    across = margin + uniform(n) * (1 - 2 * margin)
    backwards = (direction == _RIGHT_TO_LEFT) | (direction == _BOTTOM_TO_TOP)
    along_start = torch.where(backwards, 1 - along_start, along_start)
    along_end = torch.where(backwards, 1 - along_end, along_end)
    # Bouncing runs along a ground line in the lower part of the frame and hops up from it.
    ground = 0.6 + uniform(n) * (0.4 - margin)
    across = torch.where(bouncing, ground, across)
    vertical = (direction == _TOP_TO_BOTTOM) | (direction == _BOTTOM_TO_TOP)
    start = torch.stack([torch.where(vertical, across, along_start), torch.where(vertical, along_start, across)], 1)
    end = torch.stack([torch.where(vertical, across, along_end), torch.where(vertical, along_end, across)], 1)
    centre = uniform(n, 2, low=0.3, high=0.7)
    start = torch.where(rotating[:, None], centre, start)
    end = torch.where(rotating[:, None], centre, end)

    sign = torch.where(direction == _CLOCKWISE, 1.0, -1.0)
    spin = torch.where(rotating, sign * uniform(n, low=0.6 * math.pi, high=1.1 * math.pi), 0.0)

    grey = uniform(n, 1, 1, low=0.2, high=0.6)
    return ClipParams(
        shape=shape, colour=colour, motion=motion, direction=direction, rgb=rgb, size=size, start=start, end=end,
        hop_height=uniform(n, low=0.2, high=0.35), hops=torch.randint(1, 3, (n,), generator=generator).float(),
        angle=uniform(n, low=-0.15, high=0.15), spin=spin,
        background=torch.randint(_BACKGROUNDS, (n,), generator=generator),
        background_colours=(grey + uniform(n, 2, 3, low=-0.15, high=0.15)).clamp(0, 1),
        background_noise=(grey[..., None] + uniform(n, 3, 5, 5, low=-0.15, high=0.15)).clamp(0, 1),
        background_wave=torch.stack(
            [uniform(n, low=2.0, high=6.0), uniform(n, high=math.pi), uniform(n, high=2 * math.pi)], 1
        ),
    )


def _shape_distance(params: ClipParams, frames: int, height: int, width: int, lag: float = 0.0) -> torch.Tensor:
    """Signed distance in pixels from every pixel to each clip's shape, negative inside: [B, F, H, W].
    With `lag` > 0, to where the shape was `lag` frames earlier (extrapolated before the first frame)."""
    device = params.size.device
    s = (torch.arange(frames, device=device) - lag) / (frames - 1)  # [F] clip time, 0 to 1 at lag 0
    centre = params.start[:, None] + (params.end - params.start)[:, None] * s[None, :, None]  # [B, F, 2]
    hop = params.hop_height[:, None] * torch.sin(math.pi * params.hops[:, None] * s).abs()
    cy = centre[..., 1] - torch.where(params.motion[:, None] == _BOUNCING, hop, 0.0)
    cx = centre[..., 0]
    angle = params.angle[:, None] + params.spin[:, None] * s  # [B, F]

    dx = (torch.arange(width, device=device) + 0.5) - cx[..., None, None] * width  # [B, F, 1, W]
    dy = (torch.arange(height, device=device) + 0.5)[:, None] - cy[..., None, None] * height  # [B, F, H, 1]
    cos, sin = angle.cos()[..., None, None], angle.sin()[..., None, None]
    # The shape's own frame: rotating pixels by −angle draws the shape turned by +angle, which with
    # y pointing down is clockwise on screen.
    u, v = cos * dx + sin * dy, cos * dy - sin * dx  # [B, F, H, W]
    r = (params.size * min(height, width))[:, None, None, None]
    radius = torch.sqrt(u * u + v * v)

    square = torch.maximum(u.abs(), v.abs()) - 0.8 * r
    # Equilateral, apex up: the largest distance past its three edges, inradius 0.55r.
    triangle = torch.maximum(torch.maximum(v, 0.866 * u - 0.5 * v), -0.866 * u - 0.5 * v) - 0.55 * r
    # Five points, one up: the outline radius runs linearly between points (1.15r) and notches (0.5r).
    phase = (torch.atan2(v, u) + math.pi / 2) / (2 * math.pi / 5)
    to_point = 1 - 2 * (phase - phase.round()).abs()
    star = 0.6 * (radius - r * (0.5 + 0.65 * to_point))
    cross = torch.minimum(
        torch.maximum(u.abs() - 0.32 * r, v.abs() - 0.95 * r), torch.maximum(v.abs() - 0.32 * r, u.abs() - 0.95 * r)
    )
    circle = radius - 0.85 * r
    by_shape = torch.stack([square, triangle, star, cross, circle], 1)  # order of SHAPES
    return by_shape[torch.arange(len(params.shape), device=device), params.shape]


def _backgrounds(params: ClipParams, height: int, width: int) -> torch.Tensor:
    """Static textured backgrounds in [0, 1]: [B, H, W, 3]."""
    device = params.size.device
    y = ((torch.arange(height, device=device) + 0.5) / height)[:, None]  # [H, 1]
    x = (torch.arange(width, device=device) + 0.5) / width  # [W]
    freq, angle, phase = (w[:, None, None] for w in params.background_wave.unbind(1))  # [B, 1, 1]
    along = x * angle.cos() + y * angle.sin()  # [B, H, W]
    stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * freq * along + phase)
    checker = 0.5 + 0.5 * torch.tanh(4 * torch.sin(2 * math.pi * freq * x + phase) * torch.sin(2 * math.pi * freq * y))
    gradient = (along - 0.5 * (angle.cos() + angle.sin()) + 0.5).clamp(0, 1)
    c0, c1 = params.background_colours[:, 0, None, None], params.background_colours[:, 1, None, None]  # [B, 1, 1, 3]
    mixes = [c0 + (c1 - c0) * t[..., None] for t in (stripes, checker, gradient)]
    noise = F.interpolate(params.background_noise, size=(height, width), mode="bicubic", align_corners=False)
    kinds = torch.stack([noise.clamp(0, 1).permute(0, 2, 3, 1), *mixes], 1)  # [B, kinds, H, W, 3]
    return kinds[torch.arange(len(params.shape), device=device), params.background]


def render_clips(params: ClipParams, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH,
                 device=None) -> torch.Tensor:
    """Draw clips as uint8 video [B, F, H, W, 3] on `device` (default: the CPU)."""
    params = params.to(device or "cpu")
    video = _backgrounds(params, height, width)[:, None].expand(-1, frames, -1, -1, -1)  # [B, F, H, W, 3]
    rgb = params.rgb[:, None, None, None]
    # A fading trail (where the shape was TRAIL frames ago) shows the motion's direction within each
    # frame. Without it the direction only shows across frames, and a model whose only positions are
    # relative (Wan's RoPE) learned colour and shape but ignored the direction words.
    for lag, opacity in TRAIL:
        ghost = (0.5 - _shape_distance(params, frames, height, width, lag)[..., None]).clamp(0, 1)
        video = video + (rgb - video) * (opacity * ghost)
    distance = _shape_distance(params, frames, height, width)[..., None]  # [B, F, H, W, 1]
    coverage = (0.5 - distance).clamp(0, 1)  # one-pixel anti-aliased edge
    outline = (2.0 - distance).clamp(0, 1)  # a dark rim 1.5 px wide keeps the shape apart from the texture
    video = video * (1 - 0.7 * outline)
    video = video + (rgb - video) * coverage
    return (video * 255).round().to(torch.uint8)


def toy_dataset(num_clips: int, seed: int = 0, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH,
                cache_dir: str | None = None):
    """`num_clips` rendered clips as a `datasets.Dataset`: video (uint8 [F, H, W, 3]), caption, and
    the caption's parts (shape, colour, motion, direction).

    Deterministic per seed, and a prefix of the same seed's longer datasets. `datasets` caches the
    rows under `cache_dir` (default: its own cache), keyed by these arguments. Videos are stored as
    uint8; ask for them so: `.with_format("torch", dtype=torch.uint8)` (formats widen integers by default).
    """
    import datasets

    features = datasets.Features({
        "video": datasets.Array4D((frames, height, width, 3), "uint8"),
        "caption": datasets.Value("string"),
        **{name: datasets.Value("string") for name in ("shape", "colour", "motion", "direction")},
    })
    # Rendering takes a second or two: no "Generating train split" bar inside the CLI's own progress.
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return datasets.Dataset.from_generator(
            _dataset_rows, features=features, keep_in_memory=True, cache_dir=cache_dir,
            gen_kwargs=dict(num_clips=num_clips, seed=seed, frames=frames, height=height, width=width),
        )
    finally:
        if bars:
            datasets.enable_progress_bars()


def _dataset_rows(num_clips, seed, frames, height, width):
    chunk = 16
    for first in range(0, num_clips, chunk):
        # Always draw a whole chunk, so clip i does not depend on how many clips were asked for.
        params = sample_clips(chunk, clip_generator(seed, first))
        videos = render_clips(params, frames, height, width).numpy()
        motions, colours = list(MOTIONS), list(COLOURS)
        for i, caption in enumerate(params.captions()[: num_clips - first]):
            yield {
                "video": videos[i], "caption": caption, "shape": SHAPES[params.shape[i]],
                "colour": colours[params.colour[i]], "motion": motions[params.motion[i]],
                "direction": DIRECTIONS[params.direction[i]],
            }
