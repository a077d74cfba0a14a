"""What the toy teacher is: its architecture, video size, vocabulary and sampler defaults.

A leaf module, so that the model presets can name the toy without importing its clips or sampler.
"""

from __future__ import annotations

from pathlib import Path

ASSET_DIR = Path(__file__).parent.parent / "assets" / "toy"

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
