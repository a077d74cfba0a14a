"""The toy teacher: a small Wan transformer trained here on procedural clips, for offline work.

Pretrained Wan weights cannot be fetched offline and a randomly initialised model has no attention
structure worth distilling, so `--model toy` is a stock `WanTransformer3DModel` trained by
scripts/train_toy_teacher.py on clips of coloured shapes moving over textured backgrounds, each
captioned from its parameters: "a red square bouncing left to right".

- Clips: `sample_clips` draws a batch of clip parameters from a generator (so clips are
  deterministic per seed), `render_clips` draws them as uint8 video, vectorised over clips, frames
  and pixels, on CPU or GPU; `toy_dataset` exposes them as a `datasets.Dataset`.
- Codec (no VAE): pixels in [-1, 1] go through a 2×2 space-to-depth (pixel unshuffle), so 3 RGB
  channels at H×W become 12 latent channels at H/2×W/2 and frames stay frames: latent scale
  (1, 2, 2). The transformer's (1, 2, 2) patches then make one 48-value token per 4×4 pixels of a
  frame. Tokens stay well below the model width (256): with 8×8-pixel tokens (192 values) a model
  this small predicts the velocity too coarsely and samples come out blotchy.
- Positions: Wan has no absolute positions (RoPE is relative, the patch embedding has no padding),
  so on its own it cannot draw "the square starts on the left": its best guess at high noise, the
  clip the caption describes on average, is out of reach, and teachers v1–v3 took the direction of
  travel from the noise whatever the words said. The toy reads two more input channels than it
  predicts, the x and y coordinate of every latent pixel (`with_positions`), the way Wan's
  image-to-video models read their image's latents beside the noisy ones.
- Text: `CaptionEncoder`, a closed word vocabulary with learned word and position embeddings plus
  one embedding per (position, word), trained jointly with the transformer. Order decides the
  direction ("left to right" vs "right to left" hold the same words): with only word + position
  the two captions differ to the transformer only through nonlinear mixing, and teacher v2 barely
  told them apart; a word's own embedding at each position makes "left first" a feature by itself,
  as the contextual embeddings of Wan's T5 encoder would. Padding is zero, as Wan pads its text
  embeddings. The empty prompt is the unconditional input.
- Sampling: rectified flow, x_t = (1 − t)·x0 + t·ε with the model predicting v = ε − x0 at timestep
  t·1000 (Wan's convention); `sample` takes Euler steps on a shifted schedule with classifier-free
  guidance.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import SurgeryError
from .grid import video_grid

ASSET_DIR = Path(__file__).parent / "assets" / "toy"

# 16×12×12 = 2,304 tokens: 36 tiles of 4×4×4, so attention can be both local and long-range.
FRAMES, HEIGHT, WIDTH = 16, 48, 48
LATENT_SCALE = (1, 2, 2)  # pixels per latent along frames, height, width
LATENT_CHANNELS = 3 * LATENT_SCALE[1] * LATENT_SCALE[2]
POSITION_CHANNELS = 2  # x and y of every latent pixel, appended to the noisy latents (`with_positions`)
MAX_WORDS = 8  # longest caption: "an orange triangle moving bottom to top" has 7
TEXT_DIM = 64

# 4 heads × 64, 6 layers: 5.4M parameters, 10.8 MB in bf16.
TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), in_channels=LATENT_CHANNELS + POSITION_CHANNELS, out_channels=LATENT_CHANNELS,
    num_attention_heads=4, attention_head_dim=64, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=512, num_layers=6,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)

# Sampler defaults, chosen on a sweep of the trained model (docs/toy-teacher.md): guidance 3 is the
# cleanest; the shift matters little and matches the training noise levels' (scripts/train_toy_teacher.py).
SAMPLE_STEPS = 24
GUIDANCE_SCALE = 3.0
SHIFT = 3.0

# Circle comes last: a rotating circle looks still, so rotating clips draw from the others.
SHAPES = ("square", "triangle", "star", "cross", "circle")
COLOURS = {
    "red": (0.90, 0.12, 0.10), "green": (0.10, 0.72, 0.20), "blue": (0.15, 0.35, 0.95),
    "yellow": (0.96, 0.85, 0.10), "purple": (0.60, 0.20, 0.85), "orange": (1.00, 0.50, 0.05),
}
DIRECTIONS = ("left to right", "right to left", "top to bottom", "bottom to top", "clockwise", "counterclockwise")
MOTIONS = {"moving": DIRECTIONS[:4], "bouncing": DIRECTIONS[:2], "rotating": DIRECTIONS[4:]}
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


def direction_scores(model, encoder, seeds: int = 8, min_travel: float = 0.15, **sample_kwargs) -> dict:
    """Does `model` follow the direction words? For every translating motion and direction, sample
    `seeds` clips (seed i: colour i mod 6, shape i mod 5) and measure each one's `travel`; a clip
    follows its prompt when it went more than `min_travel` of the frame the prompt's way (a clip
    where the shape is not found does not). Rotation is not scored: on blurry samples the tracker
    cannot tell a turn from noise. Returns per "motion direction" the share that follows and the mean
    travel, and under "all" the share over every clip."""
    rows, hits = {}, []
    for motion, direction in TRANSLATIONS:
        prompts = [caption(list(COLOURS)[seed % len(COLOURS)], SHAPES[seed % len(SHAPES)], motion, direction)
                   for seed in range(seeds)]
        moved = [travel(sample(model, encoder, prompt, seed=seed, **sample_kwargs).cpu(), direction)
                 for seed, prompt in enumerate(prompts)]
        follows = [m > min_travel for m in moved]  # NaN > x is False
        hits += follows
        found = [m for m in moved if m == m]
        rows[f"{motion} {direction}"] = dict(
            follows=sum(follows) / seeds, mean_travel=sum(found) / len(found) if found else float("nan"))
    rows["all"] = dict(follows=sum(hits) / len(hits))
    return rows


class CaptionEncoder(nn.Module):
    """Prompts → text embeddings [B, MAX_WORDS, TEXT_DIM]: per word, its word embedding + its
    position's + its own at that position (zero at the start, so training begins from word +
    position); zero padding."""

    def __init__(self, vocabulary: list[str], max_words: int = MAX_WORDS, dim: int = TEXT_DIM):
        super().__init__()
        self.vocabulary = list(vocabulary)
        self._index = {word: i for i, word in enumerate(self.vocabulary)}
        self.words = nn.Parameter(torch.randn(len(self.vocabulary), dim))
        self.positions = nn.Parameter(torch.randn(max_words, dim))
        self.word_at_position = nn.Parameter(torch.zeros(max_words, len(self.vocabulary), dim))

    @property
    def max_words(self) -> int:
        return self.positions.shape[0]

    def word_ids(self, prompt: str) -> list[int]:
        words = prompt.lower().split()
        unknown = [w for w in words if w not in self._index]
        if unknown:
            raise SurgeryError(
                f"the toy model does not know {unknown[0]!r} (in {prompt!r}); it knows: {' '.join(self.vocabulary)}"
            )
        if len(words) > self.max_words:
            raise SurgeryError(f"{prompt!r} has {len(words)} words; the toy model reads at most {self.max_words}")
        return [self._index[w] for w in words]

    def forward(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.max_words, dtype=torch.long)
        present = torch.zeros(len(prompts), self.max_words, 1)
        for row, prompt in enumerate(prompts):
            words = self.word_ids(prompt)
            ids[row, : len(words)] = torch.tensor(words, dtype=torch.long)
            present[row, : len(words)] = 1
        device = self.words.device
        ids = ids.to(device)
        own = self.word_at_position[torch.arange(self.max_words, device=device), ids]  # [B, max_words, dim]
        return (self.words[ids] + self.positions + own) * present.to(device)

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps({"words": self.vocabulary, "max_words": self.max_words}) + "\n")
        tensors = {name: tensor.detach().float().cpu() for name, tensor in self.state_dict().items()}
        save_file(tensors, folder / "embeddings.safetensors")

    @classmethod
    def load(cls, folder: str | Path) -> "CaptionEncoder":
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            vocab = json.loads((folder / "vocab.json").read_text())
            tensors = load_file(folder / "embeddings.safetensors")
            encoder = cls(vocab["words"], vocab["max_words"], tensors["words"].shape[1])
            encoder.load_state_dict(tensors)
        # Missing files, bad JSON, unreadable safetensors; missing or misshapen tensors.
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            message = " ".join(str(e).split())  # torch's state-dict errors span lines
            raise SurgeryError(f"cannot load the caption encoder from {folder}: {message}") from None
        return encoder.eval().requires_grad_(False)


def load_caption_encoder(device=None) -> CaptionEncoder:
    """The shipped toy teacher's caption encoder (without loading its transformer)."""
    return CaptionEncoder.load(ASSET_DIR / "caption_encoder").to(device or "cpu")


def caption_embeddings(captions: list[str]) -> torch.Tensor:
    """The shipped caption encoder's embeddings of `captions`: [len, MAX_WORDS, TEXT_DIM] float32 (CPU)."""
    with torch.no_grad():
        return load_caption_encoder()(list(captions))


def decode_unit(latents: torch.Tensor) -> torch.Tensor:
    """latents [B, 12, F, H/2, W/2] → video [B, F, 3, H, W] as floats in [0, 1] (for PSNR and SSIM)."""
    return decode(latents).permute(0, 1, 4, 2, 3).float() / 255


def load_toy(device=None, dtype: torch.dtype | None = None):
    """The shipped toy teacher: (a stock `WanTransformer3DModel`, its `CaptionEncoder`)."""
    from .loading import load_model

    transformer = load_model("toy", dtype=dtype, device=device)
    return transformer, load_caption_encoder(device)


@torch.no_grad()
def sample(model, caption_encoder: CaptionEncoder, prompt: str, seed: int = 0, steps: int = SAMPLE_STEPS,
           guidance_scale: float = GUIDANCE_SCALE, shift: float = SHIFT, frames: int = FRAMES,
           height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    """Generate a clip for `prompt`: uint8 video [F, H, W, 3], deterministic per seed (on one device).

    Euler steps on rectified flow from σ = 1 (noise) to 0. The σ grid is uniform in s ∈ [1, 0] mapped
    through σ = shift·s / (1 + (shift − 1)·s), the time shift of Wan's FlowMatchEulerDiscreteScheduler,
    which spends more steps at high noise where the layout is decided. Guidance mixes the prompt's
    velocity with the empty prompt's: v = v(∅) + guidance_scale·(v(prompt) − v(∅)).
    """
    video_grid(frames, height, width, patch_size=model.config.patch_size, vae_scale=LATENT_SCALE)  # checks sizes
    device, dtype = model.device, model.dtype
    prompts = [prompt] if guidance_scale == 1 else [prompt, ""]
    text = caption_encoder(prompts).to(device, dtype)
    _, sh, sw = LATENT_SCALE
    noise_shape = (1, LATENT_CHANNELS, frames, height // sh, width // sw)
    x = torch.randn(noise_shape, generator=torch.Generator().manual_seed(seed)).to(device)  # float32 state
    s = torch.linspace(1, 0, steps + 1)
    sigmas = (shift * s / (1 + (shift - 1) * s)).tolist()
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        timestep = torch.full((len(prompts),), sigma * 1000, device=device)
        inputs = with_positions(x.to(dtype).expand(len(prompts), -1, -1, -1, -1))
        v = model(inputs, timestep, text, return_dict=False)[0].float()
        if len(prompts) == 2:
            v = v[1] + guidance_scale * (v[0] - v[1])
        x = x + (sigma_next - sigma) * v
    return decode(x)[0]
