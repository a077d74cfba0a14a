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


def build_tiny_pipeline(transformer=None, seed: int = 0):
    """WanPipeline(tokenizer, umT5 text encoder, Wan VAE, flow-match scheduler, transformer), all tiny."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from .loading import load_model

    tokenizer = _tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(
            UMT5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                       relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
        ).eval()
        z_dim = 16
        vae = AutoencoderKLWan(
            base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
        ).eval()
    transformer = transformer if transformer is not None else load_model("tiny", seed=seed)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)


# Wan2.1's text encoder (umT5-XXL's encoder) and text length; its VAE is diffusers' AutoencoderKLWan default.
UMT5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
                feed_forward_proj="gated-gelu", vocab_size=256384)
WAN_TEXT_TOKENS = 512


def build_random_pipeline(transformer, *, device, dtype=torch.bfloat16, seed: int = 0):
    """WanPipeline with Wan2.1's components at full size and random weights around `transformer` (a preset):
    the text encoder in `dtype`, the VAE in fp32 as Wan's pipelines run it. For timing only: its videos
    are noise. The tokenizer is the tiny word-level one, padded to Wan's 512 tokens."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _tokenizer(WAN_TEXT_TOKENS)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL, pad_token_id=0, eos_token_id=1)).to(dtype).eval()
        vae = AutoencoderKLWan().eval()
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer)
