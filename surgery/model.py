"""Stock Wan transformers: the named presets (built from config, or the toy's trained weights), a
local diffusers folder or a hub id, and the video size and conditioning each model expects.

Every function here returns or describes a stock diffusers `WanTransformer3DModel`; loading any
model spec, our exports included, is `surgery.loading.load_model`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import toy
from .errors import ModelLoadError
from .grid import VAE_SCALE, VideoGrid, video_grid
from .wan import SURGERY_CLASS, WAN_CLASS, WEIGHTS, WEIGHTS_INDEX, fingerprint, latent_channels

_WAN_COMMON = dict(
    patch_size=(1, 2, 2),
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)


@dataclass(frozen=True)
class Preset:
    """A named model: its config (and trained weights, if any), with the video size its commands default to."""

    config: dict
    frames: int
    height: int
    width: int
    text_tokens: int  # length of the text embedding sequence the model is conditioned on
    about: str
    vae_scale: tuple[int, int, int] = VAE_SCALE  # pixels per latent along frames, height, width
    weights: Path | None = None  # a transformer folder of trained weights; None builds random ones


PRESETS: dict[str, Preset] = {
    # Small enough that every command runs in seconds on a CPU: 4 layers, 2 heads × 32, 600 tokens.
    "tiny": Preset(
        config=dict(
            _WAN_COMMON, num_attention_heads=2, attention_head_dim=32, text_dim=32, freq_dim=32,
            ffn_dim=128, num_layers=4,
        ),
        frames=21, height=160, width=160, text_tokens=16,
        about="4-layer Wan-architecture model with random weights (seed 0), for offline runs and tests",
    ),
    # Exact published configs (Wan-AI/Wan2.1-T2V-*-Diffusers); random weights, for benchmarks.
    "wan2.1-t2v-1.3b": Preset(
        config=dict(_WAN_COMMON, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
        frames=81, height=480, width=832, text_tokens=512,
        about="Wan2.1 T2V 1.3B config, random weights",
    ),
    "wan2.1-t2v-14b": Preset(
        config=dict(_WAN_COMMON, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
        frames=81, height=720, width=1280, text_tokens=512,
        about="Wan2.1 T2V 14B config, random weights",
    ),
    # Trained here on procedural clips (surgery/toy.py); pixel space, so its "VAE" scale is the codec's.
    "toy": Preset(
        config=toy.TRANSFORMER_CONFIG, frames=toy.FRAMES, height=toy.HEIGHT, width=toy.WIDTH,
        text_tokens=toy.MAX_WORDS, vae_scale=toy.LATENT_SCALE, weights=toy.ASSET_DIR / "transformer",
        about="6-layer Wan-architecture teacher trained on moving-shape clips (prompts: surgery/toy.py)",
    ),
}

# A Wan checkpoint folder without a preset: what its commands default to.
DEFAULT_VIDEO = (81, 480, 832)
DEFAULT_TEXT_TOKENS = 512


def _transformer_dir(path: Path) -> Path:
    """The folder holding the transformer's config.json: `path` itself or a pipeline's `transformer/`."""
    if (path / "model_index.json").is_file():
        if not (path / "transformer" / "config.json").is_file():
            raise ModelLoadError(f"{path} is a pipeline folder without transformer/config.json")
        return path / "transformer"
    if (path / "config.json").is_file():
        return path
    raise ModelLoadError(f"{path} has neither model_index.json (a pipeline) nor config.json (a transformer)")


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {e}") from None
    if not isinstance(config, dict) or config.get("_class_name") not in (WAN_CLASS, SURGERY_CLASS):
        found = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise ModelLoadError(f"{folder} holds a {found!r}, not a {WAN_CLASS}")
    return config


def check_weights(folder: Path, weights: str = WEIGHTS, index_name: str = WEIGHTS_INDEX) -> None:
    """Fail with one line on missing or unreadable safetensors before diffusers gets to them."""
    from safetensors import safe_open

    if (folder / index_name).is_file():
        try:
            index = json.loads((folder / index_name).read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ModelLoadError(f"cannot read {folder / index_name}: {e}") from None
    elif (folder / weights).is_file():
        shards = [weights]
    else:
        raise ModelLoadError(f"{folder} has no {weights} (or sharded index): no weights to load")
    for shard in shards:
        try:
            with safe_open(folder / shard, framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)  # reads the header entry; a truncated file fails here
        except Exception as e:  # safetensors raises its own error types and OSError
            raise ModelLoadError(f"{folder / shard} is not a readable safetensors file ({e})") from None


def is_hub_id(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec)) and not Path(spec).exists()


def read_transformer_folder(path: Path) -> tuple[Path, dict]:
    """A local diffusers folder's transformer folder and its config, checked to be a Wan's (or an export's)."""
    folder = _transformer_dir(path)
    return folder, _read_config(folder)


def build_preset(name: str, *, dtype: torch.dtype | None = None, device=None, seed: int = 0):
    """A preset with random weights (seeded), built on `device`."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**PRESETS[name].config)
    return _cast(model, dtype) if dtype is not None else model


def load_folder(folder: Path, *, dtype: torch.dtype | None = None, device=None):
    """A stock transformer folder (config.json + safetensors) through diffusers' loader."""
    from diffusers import WanTransformer3DModel

    check_weights(folder)
    try:
        model = WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype)
    except Exception as e:  # diffusers wraps shape and key mismatches in several types
        raise ModelLoadError(f"cannot load {folder}: {str(e).splitlines()[0]}") from None
    return model.to(device) if device is not None else model


def unknown_model(spec: str) -> ModelLoadError:
    return ModelLoadError(f"unknown model {spec!r}: use one of {', '.join(PRESETS)}, a local folder or a hub id")


def _cast(model, dtype: torch.dtype):
    """`model.to(dtype)`, keeping diffusers' `_keep_in_fp32_modules` (norms, time embedding,
    modulation tables, RoPE) in fp32 for half dtypes, as `from_pretrained(torch_dtype=...)` does."""
    model = torch.nn.Module.to(model, dtype=dtype)  # ModelMixin.to warns about what we handle below
    if dtype in (torch.float16, torch.bfloat16):
        keep = set(model._keep_in_fp32_modules or ())
        for name, module in model.named_modules():
            if keep & set(name.split(".")):
                module.float()
        for name, param in model.named_parameters():
            if keep & set(name.split(".")):
                param.data = param.data.float()
    return model


def load_from_hub(spec: str, *, dtype: torch.dtype | None = None, device=None):
    """From the local Hub cache if it is there; else one quick metadata request before downloading,
    so that no network is one clear line instead of minutes of retries."""
    import warnings

    import huggingface_hub
    from diffusers import WanTransformer3DModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hub deprecation chatter would break the one-line error
        try:
            model = WanTransformer3DModel.from_pretrained(
                spec, subfolder="transformer", torch_dtype=dtype, local_files_only=True)
            return model.to(device) if device is not None else model
        except Exception:
            pass
        try:
            huggingface_hub.model_info(spec, timeout=10)
            model = WanTransformer3DModel.from_pretrained(spec, subfolder="transformer", torch_dtype=dtype)
            return model.to(device) if device is not None else model
        except Exception as e:
            # A hub id looks like a relative path: the user may have meant either.
            raise ModelLoadError(
                f"{spec!r} is neither a local folder (no such path) nor a model the Hugging Face Hub gives "
                f"({type(e).__name__}); check the path, or the id and the network"
            ) from None


def default_video(spec: str) -> tuple[int, int, int]:
    """(frames, height, width) in pixels that commands use for `spec` unless told otherwise."""
    preset = PRESETS.get(spec)
    return (preset.frames, preset.height, preset.width) if preset else DEFAULT_VIDEO


def default_text_tokens(spec: str) -> int:
    preset = PRESETS.get(spec)
    return preset.text_tokens if preset else DEFAULT_TEXT_TOKENS


def resolve_grid(spec: str, config: dict, frames=None, height=None, width=None) -> VideoGrid:
    """The token grid for a video size, with the model's default size filling unset values."""
    d_frames, d_height, d_width = default_video(spec)
    preset = PRESETS.get(spec)
    return video_grid(  # None means the default; 0 is a size like any other, and rejected
        d_frames if frames is None else frames,
        d_height if height is None else height,
        d_width if width is None else width,
        patch_size=tuple(config["patch_size"]),
        vae_scale=preset.vae_scale if preset else VAE_SCALE,
    )


def is_toy(config: dict) -> bool:
    """Whether `config` is the toy teacher's architecture (the preset, a training run's or an export of it)."""
    return fingerprint(config) == fingerprint(PRESETS["toy"].config)


def conditioner(config: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """noisy latents [B, latent_channels, F, H, W] → the transformer's input. A model that reads more
    channels than it predicts gets them appended: the toy its pixel coordinates
    (surgery.toy.with_positions), any other (Wan image-to-video: an image's latents and mask) zeros,
    that is no image."""
    if is_toy(config):
        return toy.with_positions
    extra = config["in_channels"] - latent_channels(config)
    if extra <= 0:
        return lambda noisy: noisy
    return lambda noisy: torch.cat([noisy, noisy.new_zeros(noisy.shape[0], extra, *noisy.shape[2:])], 1)
