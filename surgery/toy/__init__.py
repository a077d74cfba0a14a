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
  guidance. `teacher.load_toy` loads the shipped transformer and caption encoder.
"""

from .captions import CaptionEncoder, caption_embeddings, load_caption_encoder
from .clips import ClipParams, caption, caption_vocabulary, clip_generator, render_clips, sample_clips, toy_dataset
from .codec import decode, decode_unit, encode, with_positions
from .sampling import sample
from .scores import TRANSLATIONS, TRAVEL_AXES, direction_scores, shape_track, travel
from .spec import (
    ASSET_DIR, COLOURS, DIRECTIONS, FRAMES, GUIDANCE_SCALE, HEIGHT, LATENT_CHANNELS, LATENT_SCALE, MAX_WORDS, MOTIONS,
    POSITION_CHANNELS, SAMPLE_STEPS, SHAPES, SHIFT, TEXT_DIM, TRANSFORMER_CONFIG, WIDTH,
)

__all__ = [
    "ASSET_DIR", "COLOURS", "DIRECTIONS", "FRAMES", "GUIDANCE_SCALE", "HEIGHT", "LATENT_CHANNELS", "LATENT_SCALE",
    "MAX_WORDS", "MOTIONS", "POSITION_CHANNELS", "SAMPLE_STEPS", "SHAPES", "SHIFT", "TEXT_DIM", "TRANSFORMER_CONFIG",
    "TRANSLATIONS", "TRAVEL_AXES", "WIDTH", "CaptionEncoder", "ClipParams", "caption", "caption_embeddings",
    "caption_vocabulary", "clip_generator", "decode", "decode_unit", "direction_scores", "encode",
    "load_caption_encoder", "render_clips", "sample", "sample_clips", "shape_track", "toy_dataset", "travel",
    "with_positions",
]
