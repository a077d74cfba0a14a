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
from .errors import ModelLoadError, PlanError
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
    # Wan2.2 A14B: two experts of this config, `transformer` for timesteps ≥ boundary_ratio·1000 (high noise)
    # and `transformer_2` below it; None: one transformer.
    boundary_ratio: float | None = None
    image_tokens: int | None = None  # CLIP image tokens of a model with image_dim (Wan2.1 I2V)
    expand_timesteps: bool = False  # Wan2.2 TI2V: one timestep per token, an optional first-frame image


_TINY = dict(_WAN_COMMON, num_attention_heads=2, attention_head_dim=32, text_dim=32, freq_dim=32, ffn_dim=128,
             num_layers=4)
_WAN_14B = dict(_WAN_COMMON, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)
# Image-to-video reads 16 noisy + 4 mask + 16 image-latent channels; Wan2.1's also attends to CLIP image
# tokens through cross-attention's added key/value projections (diffusers hardcodes 512 text tokens there).
_I2V_CHANNELS = dict(in_channels=36, out_channels=16)
TINY_IMAGE_DIM = 32  # the tiny CLIP vision encoder's width (surgery.pipeline)
# Wan2.2's VAE: 48 latent channels, 16× in space.
_TI2V_CHANNELS = dict(in_channels=48, out_channels=48)
TI2V_VAE_SCALE = (4, 16, 16)

PRESETS: dict[str, Preset] = {
    # Small enough that every command runs in seconds on a CPU: 4 layers, 2 heads × 32, 600 tokens.
    "tiny": Preset(
        config=_TINY, frames=21, height=160, width=160, text_tokens=16,
        about="4-layer Wan-architecture model with random weights (seed 0), for offline runs and tests",
    ),
    # The tiny model in the shape of each Wan checkpoint kind (random weights; a second expert is seed + 1).
    "tiny-wan2.1-i2v": Preset(
        config=dict(_TINY, **_I2V_CHANNELS, image_dim=TINY_IMAGE_DIM, added_kv_proj_dim=64),
        frames=21, height=160, width=160, text_tokens=512, image_tokens=5,
        about="the tiny model as Wan2.1 image-to-video (image latents in, CLIP image tokens in cross-attention)",
    ),
    "tiny-wan2.2": Preset(
        config=_TINY, frames=21, height=160, width=160, text_tokens=16, boundary_ratio=0.875,
        about="the tiny model as Wan2.2 T2V-A14B: two experts switched at boundary ratio 0.875",
    ),
    "tiny-wan2.2-i2v": Preset(
        config=dict(_TINY, **_I2V_CHANNELS), frames=21, height=160, width=160, text_tokens=16, boundary_ratio=0.9,
        about="the tiny model as Wan2.2 I2V-A14B: two image-to-video experts switched at boundary ratio 0.9",
    ),
    "tiny-wan2.2-ti2v": Preset(
        config=dict(_TINY, **_TI2V_CHANNELS), frames=21, height=320, width=320, text_tokens=16,
        vae_scale=TI2V_VAE_SCALE, expand_timesteps=True,
        about="the tiny model as Wan2.2 TI2V-5B: 48 latent channels, 16× VAE, optional first-frame image",
    ),
    # Exact published configs (Wan-AI/Wan2.*-Diffusers); random weights, for benchmarks.
    "wan2.1-t2v-1.3b": Preset(
        config=dict(_WAN_COMMON, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
        frames=81, height=480, width=832, text_tokens=512,
        about="Wan2.1 T2V 1.3B config, random weights",
    ),
    "wan2.1-t2v-14b": Preset(
        config=_WAN_14B, frames=81, height=720, width=1280, text_tokens=512,
        about="Wan2.1 T2V 14B config, random weights",
    ),
    "wan2.1-i2v-14b-480p": Preset(
        config=dict(_WAN_14B, **_I2V_CHANNELS, image_dim=1280, added_kv_proj_dim=5120),
        frames=81, height=480, width=832, text_tokens=512, image_tokens=257,
        about="Wan2.1 I2V 14B 480p config, random weights",
    ),
    "wan2.1-i2v-14b-720p": Preset(
        config=dict(_WAN_14B, **_I2V_CHANNELS, image_dim=1280, added_kv_proj_dim=5120),
        frames=81, height=720, width=1280, text_tokens=512, image_tokens=257,
        about="Wan2.1 I2V 14B 720p config (the 480p one's architecture), random weights",
    ),
    "wan2.2-t2v-a14b": Preset(
        config=_WAN_14B, frames=81, height=720, width=1280, text_tokens=512, boundary_ratio=0.875,
        about="Wan2.2 T2V A14B config: two 14B experts, random weights",
    ),
    "wan2.2-i2v-a14b": Preset(
        config=dict(_WAN_14B, **_I2V_CHANNELS), frames=81, height=720, width=1280, text_tokens=512,
        boundary_ratio=0.9, about="Wan2.2 I2V A14B config: two 14B image-to-video experts, random weights",
    ),
    "wan2.2-ti2v-5b": Preset(
        config=dict(_WAN_COMMON, **_TI2V_CHANNELS, num_attention_heads=24, attention_head_dim=128, ffn_dim=14336,
                    num_layers=30),
        frames=121, height=704, width=1280, text_tokens=512, vae_scale=TI2V_VAE_SCALE, expand_timesteps=True,
        about="Wan2.2 TI2V 5B config (48-channel VAE), random weights",
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


# diffusers' names of Wan2.2's experts: `transformer` denoises high noise, `transformer_2` low noise.
EXPERTS = ("transformer", "transformer_2")
EXPERT_SEPARATOR = "@"  # "tiny-wan2.2@transformer_2": one expert of a two-expert model, as a model spec


def split_expert(spec: str) -> tuple[str, str | None]:
    """"M@transformer_2" → ("M", "transformer_2"); a spec without an expert → (spec, None)."""
    base, sep, expert = spec.rpartition(EXPERT_SEPARATOR)
    return (base, expert) if sep and expert in EXPERTS else (spec, None)


def expert_spec(spec: str, expert: str) -> str:
    return f"{spec}{EXPERT_SEPARATOR}{expert}"


def check_expert(plan, spec: str) -> None:
    """PlanError when `plan` (a surgery.plan.Plan) was made for one expert and `spec` is the other: their architectures match, so the
    fingerprint cannot tell them apart, but each was calibrated (and trained) on its own timesteps."""
    planned, expert = split_expert(plan.model)[1], split_expert(spec)[1]
    if planned is not None and planned != (expert or EXPERTS[0]):
        raise PlanError(f"the plan was made for expert {planned} ({plan.model}); {spec} is "
                        f"{expert or 'not that expert'}: use the plan file's plan for {expert or 'it'}")


def _pipeline_index(path: Path) -> dict | None:
    """A pipeline folder's model_index.json, or None for any other folder."""
    if not (path / "model_index.json").is_file():
        return None
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path / 'model_index.json'}: {e}") from None
    if not isinstance(index, dict):
        raise ModelLoadError(f"{path / 'model_index.json'} is not a JSON object")
    return index


def _has_component(index: dict, name: str) -> bool:
    entry = index.get(name)  # an absent optional component is [null, null]
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def _transformer_dir(path: Path, expert: str | None = None) -> Path:
    """The folder holding a transformer's config.json: `path` itself or a pipeline's `transformer/` (or the
    named expert's). A two-expert pipeline without an expert named is refused: one transformer is half of it."""
    index = _pipeline_index(path)
    if index is not None:
        if expert is None and _has_component(index, EXPERTS[1]):
            raise ModelLoadError(
                f"{path} holds two experts (transformer, transformer_2): load it as a pipeline, or name one "
                f"({path}{EXPERT_SEPARATOR}transformer)")
        name = expert or EXPERTS[0]
        if not (path / name / "config.json").is_file():
            raise ModelLoadError(f"{path} is a pipeline folder without {name}/config.json")
        return path / name
    if expert not in (None, EXPERTS[0]):
        raise ModelLoadError(f"{path} is a single transformer: it has no {expert}")
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


def read_transformer_folder(path: Path, expert: str | None = None) -> tuple[Path, dict]:
    """A local diffusers folder's transformer folder (or the named expert's) and its config, checked to be a
    Wan's (or an export's)."""
    folder = _transformer_dir(path, expert)
    return folder, _read_config(folder)


def build_preset(name: str, *, dtype: torch.dtype | None = None, device=None, seed: int = 0,
                 expert: str | None = None):
    """A preset with random weights (seeded; a second expert from the next seed), built on `device`."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(seed + (expert == EXPERTS[1]))
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


def load_from_hub(spec: str, *, dtype: torch.dtype | None = None, device=None, subfolder: str = "transformer"):
    """From the local Hub cache if it is there; else one quick metadata request before downloading,
    so that no network is one clear line instead of minutes of retries."""
    import warnings

    import huggingface_hub
    from diffusers import WanTransformer3DModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hub deprecation chatter would break the one-line error
        try:
            model = WanTransformer3DModel.from_pretrained(
                spec, subfolder=subfolder, torch_dtype=dtype, local_files_only=True)
            return model.to(device) if device is not None else model
        except Exception:
            pass
        try:
            huggingface_hub.model_info(spec, timeout=10)
            model = WanTransformer3DModel.from_pretrained(spec, subfolder=subfolder, torch_dtype=dtype)
            return model.to(device) if device is not None else model
        except Exception as e:
            # A hub id looks like a relative path: the user may have meant either.
            raise ModelLoadError(
                f"{spec!r} is neither a local folder (no such path) nor a model the Hugging Face Hub gives "
                f"({type(e).__name__}); check the path, or the id and the network"
            ) from None


@dataclass(frozen=True)
class ModelKind:
    """What a model spec is beyond one transformer's config: its experts, the noise band each serves,
    the image it takes and its VAE's scale (from the preset, or a pipeline folder's model_index.json)."""

    experts: tuple[str, ...]  # ("transformer",) or EXPERTS
    boundary_ratio: float | None  # two experts: `transformer` serves timesteps ≥ boundary_ratio·1000
    image: str | None  # "required" (image-to-video), "optional" (TI2V's first frame) or None (text only)
    vae_scale: tuple[int, int, int]
    frames: int
    height: int
    width: int
    text_tokens: int
    image_tokens: int | None  # CLIP image tokens, for a model with image_dim
    expand_timesteps: bool = False

    @property
    def two_experts(self) -> bool:
        return len(self.experts) == 2


def model_kind(spec: str) -> ModelKind:
    """The kind of model `spec` (or of the model whose expert `spec` names) is; reads no weights."""
    spec, _ = split_expert(spec)
    preset = PRESETS.get(spec)
    if preset is not None:
        config = preset.config
        ratio, expand, vae_scale = preset.boundary_ratio, preset.expand_timesteps, preset.vae_scale
        video, text_tokens, image_tokens = (preset.frames, preset.height, preset.width), preset.text_tokens, \
            preset.image_tokens
    else:
        path = Path(spec)
        index = _pipeline_index(path) if path.is_dir() else None
        two = index is not None and _has_component(index, EXPERTS[1])
        config = _read_config(_transformer_dir(path, EXPERTS[0] if two else None)) if path.is_dir() else {}
        ratio = index.get("boundary_ratio") if two else None
        expand = bool(index and index.get("expand_timesteps"))
        vae_scale = _folder_vae_scale(path, config) if path.is_dir() else VAE_SCALE
        video, text_tokens = DEFAULT_VIDEO, DEFAULT_TEXT_TOKENS
        image_tokens = _folder_image_tokens(path) if config.get("image_dim") else None
    image = "required" if config and config["in_channels"] > latent_channels(config) and not is_toy(config) else \
        "optional" if expand else None
    experts = EXPERTS if ratio is not None else EXPERTS[:1]
    return ModelKind(experts, ratio, image, tuple(vae_scale), *video, text_tokens, image_tokens, expand)


def is_two_expert_spec(spec: str) -> bool:
    """Whether `spec` names a two-expert model as a whole (Wan2.2 A14B), not one of its experts or one transformer.
    A spec naming an expert answers without reading a folder's configs."""
    return split_expert(spec)[1] is None and model_kind(spec).two_experts


def _folder_vae_scale(path: Path, config: dict) -> tuple[int, int, int]:
    """A pipeline's VAE scale from vae/config.json; a bare transformer's from its latent channels (Wan2.2's VAE
    has 48)."""
    try:
        vae = json.loads((path / "vae" / "config.json").read_text())
        return (vae.get("scale_factor_temporal") or 4, *(2 * [vae.get("scale_factor_spatial") or 8]))
    except (OSError, json.JSONDecodeError, AttributeError):
        return TI2V_VAE_SCALE if config and latent_channels(config) == 48 else VAE_SCALE


def _folder_image_tokens(path: Path) -> int:
    """Tokens of the pipeline's CLIP image encoder (patches + class token); Wan2.1's 257 without one."""
    try:
        clip = json.loads((path / "image_encoder" / "config.json").read_text())
        return (clip["image_size"] // clip["patch_size"]) ** 2 + 1
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return 257


def default_video(spec: str) -> tuple[int, int, int]:
    """(frames, height, width) in pixels that commands use for `spec` unless told otherwise."""
    preset = PRESETS.get(split_expert(spec)[0])
    return (preset.frames, preset.height, preset.width) if preset else DEFAULT_VIDEO


def default_text_tokens(spec: str) -> int:
    preset = PRESETS.get(split_expert(spec)[0])
    return preset.text_tokens if preset else DEFAULT_TEXT_TOKENS


def resolve_grid(spec: str, config: dict, frames=None, height=None, width=None) -> VideoGrid:
    """The token grid for a video size, with the model's default size filling unset values."""
    d_frames, d_height, d_width = default_video(spec)
    base = split_expert(spec)[0]
    preset = PRESETS.get(base)
    if preset is not None:
        vae_scale = preset.vae_scale
    elif Path(base).is_dir():
        vae_scale = model_kind(base).vae_scale
    else:
        vae_scale = TI2V_VAE_SCALE if latent_channels(config) == 48 else VAE_SCALE
    return video_grid(  # None means the default; 0 is a size like any other, and rejected
        d_frames if frames is None else frames,
        d_height if height is None else height,
        d_width if width is None else width,
        patch_size=tuple(config["patch_size"]),
        vae_scale=vae_scale,
    )


def timestep_band(spec: str, dense_boundary: float | None = None) -> tuple[float, float]:
    """The timesteps (as fractions of 1000, [low, high)) that model `spec`'s planned attention serves in sampling:
    all of them for one transformer; for one expert of two, its side of the boundary; below `dense_boundary`
    (a plan's, `surgery.plan.Plan.dense_boundary`), where the steps above it run dense."""
    base, expert = split_expert(spec)
    ratio = model_kind(base).boundary_ratio if expert is not None else None
    band = (0.0, 1.0) if ratio is None else (ratio, 1.0) if expert == EXPERTS[0] else (0.0, ratio)
    return band if dense_boundary is None else (band[0], min(band[1], dense_boundary))


def is_toy(config: dict) -> bool:
    """Whether `config` is the toy teacher's architecture (the preset, a training run's or an export of it)."""
    return fingerprint(config) == fingerprint(PRESETS["toy"].config)


def conditioner(config: dict) -> Callable[..., torch.Tensor]:
    """condition(noisy, image=None): noisy latents [B, latent_channels, F, H, W] → the transformer's input.
    A model that reads more channels than it predicts gets them appended: the toy its pixel coordinates
    (surgery.toy.with_positions); Wan image-to-video a mask of the given frames (one per VAE time step of the
    first latent frame) and the image's latents `image` [B, latent_channels, F', H, W] (of the image and black
    frames after it, as diffusers' WanImageToVideoPipeline encodes them; F' = 1: the first frame, zeros after it);
    without an image, zeros."""
    if is_toy(config):
        return lambda noisy, image=None: toy.with_positions(noisy)
    extra = config["in_channels"] - latent_channels(config)
    if extra <= 0:
        return lambda noisy, image=None: noisy

    def condition(noisy, image=None):
        b, c, f, h, w = noisy.shape
        if image is None:
            return torch.cat([noisy, noisy.new_zeros(b, extra, f, h, w)], 1)
        mask = noisy.new_zeros(b, extra - c, f, h, w)
        mask[:, :, 0] = 1
        latents = torch.cat([image.to(noisy), noisy.new_zeros(b, c, f - image.shape[2], h, w)], 2)
        return torch.cat([noisy, mask, latents], 1)

    return condition


def image_embeddings(config: dict, image_tokens: int | None, batch: int, generator=None) -> torch.Tensor | None:
    """Random CLIP image tokens [B, image_tokens, image_dim] for a model that attends to them (Wan2.1 I2V):
    what a random latent is to an image, for calibration and self-distillation; None for any other model."""
    if not config.get("image_dim"):
        return None
    return torch.randn(batch, image_tokens or 257, config["image_dim"], generator=generator)
