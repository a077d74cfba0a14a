"""Whole `WanPipeline`s built in code (no network): a tiny one around the tiny transformer, and one of
Wan2.1's full size with random weights around a preset, for timing whole videos.

Text conditioning for `--model tiny` comes from a small umT5 encoder with random weights (seed 0)
over a word-level vocabulary: it makes prompts deterministic conditioning vectors, not meaning.
Real pipelines load from a diffusers folder; the toy teacher has its own sampler (surgery.toy).
"""

from __future__ import annotations

import torch

# Words the tiny tokenizer knows; anything else maps to [unk].
_VOCAB = (
    "a an the of and with on in to from left right up down red green blue yellow white black orange purple "
    "square circle triangle ball cat dog car bird tree sky sea city street moving bouncing rotating flying "
    "running walking slowly quickly video shot camera scene close wide"
).split()
TEXT_TOKENS = 16
TEXT_DIM = 32  # the tiny transformer's text_dim
# The tiny model in the shape of each other Wan kind: exported and sampled as whole pipelines.
TINY_FORMS = ("tiny-wan2.1-i2v", "tiny-wan2.2", "tiny-wan2.2-i2v", "tiny-wan2.2-ti2v")


def _tokenizer(max_length: int = TEXT_TOKENS):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[pad]", "[eos]", "[unk]"]
    vocab = {word: i for i, word in enumerate(specials + _VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[unk]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[pad]", eos_token="[eos]", unk_token="[unk]", model_max_length=max_length
    )


def build_tiny_pipeline(transformer=None, seed: int = 0, spec: str = "tiny", transformer_2=None):
    """The pipeline of a tiny form (`spec`: "tiny" or "tiny-wan2.*"), all of it tiny: tokenizer, umT5 text
    encoder, Wan VAE (Wan2.2's 48-channel, 16× kind for TI2V), flow-match scheduler and the transformer (its
    two experts for Wan2.2 A14B, with the boundary ratio); image-to-video kinds get WanImageToVideoPipeline,
    Wan2.1's with a tiny CLIP vision encoder. Transformers not given are the preset's."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from .loading import load_model
    from .model import PRESETS, expert_spec, model_kind

    kind, preset = model_kind(spec), PRESETS[spec]
    tokenizer = _tokenizer(kind.text_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(
            UMT5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                       relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
        ).eval()
        z_dim = preset.config["out_channels"]
        # Wan2.2's VAE folds 2×2 pixels into channels (patch_size 2) before its 8× encoder: 16× in all.
        wan22 = dict(is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16) \
            if kind.vae_scale[1] == 16 else {}
        vae = AutoencoderKLWan(
            base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim, **wan22,
        ).eval()
        image_parts = _tiny_image_encoder() if preset.config.get("image_dim") else {}
    if kind.two_experts:
        transformer = transformer if transformer is not None else load_model(expert_spec(spec, "transformer"), seed=seed)
        transformer_2 = transformer_2 if transformer_2 is not None else \
            load_model(expert_spec(spec, "transformer_2"), seed=seed)
    else:
        transformer = transformer if transformer is not None else load_model(spec, seed=seed)
    parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                 scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer_2=transformer_2,
                 boundary_ratio=kind.boundary_ratio, expand_timesteps=kind.expand_timesteps)
    if kind.image == "required":
        # Imported only here: it imports transformers' CLIP image processor, which warns without torchvision.
        from diffusers import WanImageToVideoPipeline

        return WanImageToVideoPipeline(**parts, **image_parts)
    return WanPipeline(**parts)


def _tiny_image_encoder() -> dict:
    """A CLIP vision encoder of the tiny I2V transformer's image_dim over 32×32 images in 16×16 patches: 4 patch
    tokens + the class token, the 5 image tokens the tiny-wan2.1-i2v preset attends to."""
    # The PIL processor: CLIPImageProcessor's default one needs torchvision, which is not a dependency.
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    from .model import TINY_IMAGE_DIM

    encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=TINY_IMAGE_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=16)).eval()
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return dict(image_encoder=encoder, image_processor=processor)


# Wan2.1's text encoder (umT5-XXL's encoder) and text length; its VAE is diffusers' AutoencoderKLWan default.
UMT5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
                feed_forward_proj="gated-gelu", vocab_size=256384)
WAN_TEXT_TOKENS = 512
# Wan2.2's VAE (Wan-AI/Wan2.2-TI2V-5B-Diffusers): 48 latent channels, 2×2 pixels folded into channels, 16× in space.
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
                 patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48)


def build_random_pipeline(transformer, *, device, dtype=torch.bfloat16, seed: int = 0, spec: str = "wan2.1-t2v-1.3b"):
    """WanPipeline with Wan's components at full size and random weights around `transformer` (preset `spec`):
    the text encoder in `dtype`, the VAE in fp32 as Wan's pipelines run it (Wan2.2's 48-channel one, with one
    timestep per token, for TI2V). For timing only: its videos are noise. The tokenizer is the tiny word-level
    one, padded to Wan's 512 tokens."""
    from .model import model_kind

    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _tokenizer(WAN_TEXT_TOKENS)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL, pad_token_id=0, eos_token_id=1)).to(dtype).eval()
        vae = AutoencoderKLWan(**WAN22_VAE).eval() if model_kind(spec).expand_timesteps else AutoencoderKLWan().eval()
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer,
                       expand_timesteps=model_kind(spec).expand_timesteps)
