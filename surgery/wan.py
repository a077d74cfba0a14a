"""Facts about Wan transformers that every layer of the library shares: class and file names,
the architecture fingerprint, and how self-attention layers are named.

A leaf module: it imports nothing from the rest of the package.
"""

from __future__ import annotations

import hashlib
import json
import re

from .errors import PlanError

WAN_CLASS = "WanTransformer3DModel"
SURGERY_CLASS = "SurgeryWanTransformer3DModel"  # an export of ours: see surgery/retrofitted.py
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"

_SELF_ATTENTION = re.compile(r"blocks\.(\d+)\.attn1")


def self_attention_fqn(layer: int) -> str:
    """The module name of layer `layer`'s self-attention: `blocks.N.attn1`."""
    return f"blocks.{layer}.attn1"


def self_attention_fqns(num_layers: int) -> list[str]:
    return [self_attention_fqn(i) for i in range(num_layers)]


def layer_index(fqn: str) -> int:
    """`blocks.N.attn1` → N; anything else is a one-line error."""
    match = _SELF_ATTENTION.fullmatch(fqn)
    if match is None:
        raise PlanError(f"{fqn!r} is not a self-attention layer name (blocks.N.attn1)")
    return int(match.group(1))


def fingerprint(config: dict) -> str:
    """A short hash of the architecture config: plans refuse models whose fingerprint differs."""
    import inspect

    from diffusers import WanTransformer3DModel

    # Only Wan's own arguments, defaults filled: a preset dict, a loaded model's config and an
    # exported surgery model's config (which adds its plan) hash alike.
    defaults = {
        name: p.default for name, p in inspect.signature(WanTransformer3DModel.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    public = {name: config.get(name, default) for name, default in defaults.items()}
    public = json.loads(json.dumps(public, default=list))  # tuples and lists hash alike
    digest = hashlib.sha256(json.dumps(public, sort_keys=True).encode()).hexdigest()
    return digest[:16]


def input_dtype(model):
    """The dtype a Wan transformer's inputs must have: its patch embedding's. (The first parameter can be one of
    the modules diffusers keeps in fp32 when the rest is bf16.)"""
    return model.patch_embedding.weight.dtype


def latent_channels(config: dict) -> int:
    """Channels of the latents a model denoises (what it predicts)."""
    return config.get("out_channels") or config["in_channels"]
