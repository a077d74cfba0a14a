import json

import pytest
import torch

import surgery
from surgery.errors import ModelLoadError
from surgery.grid import VideoGrid

from .conftest import model_inputs


def _same_output(a, b):
    """Same weights give the same output (a reloaded model may take other matmul paths: 1e-6)."""
    inputs = model_inputs(a, VideoGrid(2, 3, 4), batch=1)
    with torch.no_grad():
        return (a(**inputs).sample - b(**inputs).sample).abs().max().item() <= 1e-6


def test_tiny_is_deterministic():
    assert _same_output(surgery.load_model("tiny"), surgery.load_model("tiny"))


def test_load_transformer_folder(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "transformer")
    assert _same_output(surgery.load_model(str(tmp_path / "transformer")), tiny_model)


def test_load_pipeline_folder(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    assert _same_output(surgery.load_model(str(tmp_path)), tiny_model)


def test_load_sharded_folder(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert _same_output(surgery.load_model(str(tmp_path)), tiny_model)


def test_wrong_class_is_refused(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, _class_name="UNet2DConditionModel")))
    with pytest.raises(ModelLoadError, match="UNet2DConditionModel"):
        surgery.load_model(str(tmp_path))


def test_missing_weights_are_refused(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no diffusion_pytorch_model.safetensors"):
        surgery.load_model(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_are_refused(tiny_model, tmp_path, damage):
    tiny_model.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        surgery.load_model(str(tmp_path))


def test_unknown_spec_and_unreachable_hub():
    with pytest.raises(ModelLoadError, match="unknown model"):
        surgery.load_model("no-such-thing")
    with pytest.raises(ModelLoadError, match="is neither a local folder .* nor a model the Hugging Face Hub gives"):
        surgery.load_model("vsurgery-tests/not-a-real-repo")


def test_presets_have_the_published_configs():
    small, large = surgery.load_config("wan2.1-t2v-1.3b"), surgery.load_config("wan2.1-t2v-14b")
    assert (small["num_layers"], small["num_attention_heads"], small["ffn_dim"]) == (30, 12, 8960)
    assert (large["num_layers"], large["num_attention_heads"], large["ffn_dim"]) == (40, 40, 13824)
    assert small["attention_head_dim"] == large["attention_head_dim"] == 128


def test_half_precision_presets_keep_diffusers_fp32_modules():
    model = surgery.load_model("tiny", dtype=torch.bfloat16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.blocks[0].scale_shift_table.dtype == torch.float32
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert model.rope.freqs_cos.dtype == torch.float32


def test_conditioner_appends_what_the_model_reads_beyond_its_latents():
    from surgery.loading import load_config
    from surgery.model import conditioner
    from surgery.wan import latent_channels

    noisy = torch.randn(2, 16, 3, 4, 6)
    assert conditioner(load_config("tiny"))(noisy) is noisy
    # Wan image-to-video reads 36 channels and predicts 16: no image is zeros.
    i2v = dict(load_config("wan2.1-t2v-1.3b"), in_channels=36)
    assert latent_channels(i2v) == 16
    inputs = conditioner(i2v)(noisy)
    assert inputs.shape == (2, 36, 3, 4, 6) and torch.equal(inputs[:, :16], noisy) and not inputs[:, 16:].any()
    toy_config = load_config("toy")
    assert latent_channels(toy_config) == 12 and toy_config["in_channels"] == 14
    inputs = conditioner(toy_config)(torch.zeros(1, 12, 2, 3, 5))
    assert inputs.shape == (1, 14, 2, 3, 5)
    x, y = inputs[0, 12], inputs[0, 13]  # [F, h, w]: x runs along the width, y down the height
    assert torch.equal(x[0, 0], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])) and torch.equal(x[1], x[0])
    assert torch.equal(y[0, :, 0], torch.tensor([-1.0, 0.0, 1.0])) and torch.equal(y[0, :, 4], y[0, :, 0])
