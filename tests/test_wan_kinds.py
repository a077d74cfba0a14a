"""Every Wan checkpoint kind: Wan2.1 image-to-video, Wan2.2's two experts and TI2V-5B, as presets (the published
configs) and tiny forms built in code."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

import surgery
from surgery.cli.app import app
from surgery.errors import ModelLoadError
from surgery.grid import VideoGrid
from surgery.info import forward_flops, model_info
from surgery.model import model_kind, timestep_band
from surgery.wan import fingerprint


def test_presets_match_the_published_configs():
    i2v = surgery.load_config("wan2.1-i2v-14b-480p")
    assert surgery.load_config("wan2.1-i2v-14b-720p") == i2v
    assert (i2v["in_channels"], i2v["out_channels"], i2v["image_dim"], i2v["added_kv_proj_dim"]) == (36, 16, 1280, 5120)
    assert (i2v["num_layers"], i2v["num_attention_heads"], i2v["attention_head_dim"]) == (40, 40, 128)
    for name, ratio, channels in (("wan2.2-t2v-a14b", 0.875, 16), ("wan2.2-i2v-a14b", 0.9, 36)):
        config, kind = surgery.load_config(name), model_kind(name)
        assert kind.experts == ("transformer", "transformer_2") and kind.boundary_ratio == ratio
        assert (config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"]) == (40, 5120)
        assert (config["in_channels"], config["out_channels"], config["image_dim"]) == (channels, 16, None)
    ti2v, kind = surgery.load_config("wan2.2-ti2v-5b"), model_kind("wan2.2-ti2v-5b")
    assert (ti2v["num_layers"], ti2v["num_attention_heads"], ti2v["attention_head_dim"], ti2v["ffn_dim"]) == \
        (30, 24, 128, 14336)
    assert (ti2v["in_channels"], ti2v["out_channels"]) == (48, 48)
    assert kind.vae_scale == (4, 16, 16) and kind.expand_timesteps and kind.image == "optional"
    assert model_kind("wan2.1-i2v-14b-720p").image == "required" and model_kind("wan2.1-t2v-14b").image is None


def test_info_of_each_preset_at_its_native_size():
    ti2v = model_info("wan2.2-ti2v-5b")  # 121×704×1280 through the 16× VAE
    assert ti2v.grid == {"frames": 31, "height": 22, "width": 40} and ti2v.tokens == 27_280
    i2v = model_info("wan2.1-i2v-14b-480p")
    assert i2v.tokens == 32_760 and i2v.image_tokens == 257 and i2v.image == "required"
    result = CliRunner().invoke(app, ["info", "--model", "wan2.2-t2v-a14b", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["tokens"] == 75_600  # 720p, 81 frames
    assert set(info["experts"]) == {"transformer", "transformer_2"}
    high, low = info["experts"]["transformer"], info["experts"]["transformer_2"]
    assert high["layers"] == low["layers"] == 40 and high["timesteps"] == [875, 1000] and low["timesteps"] == [0, 875]
    # 4·H·S²·D per layer, 40 layers
    assert high["self_attention_flops"] == low["self_attention_flops"] == 40 * 4 * 40 * 75_600**2 * 128


def test_forward_flops_of_image_models_match_torch_flop_counter():
    grid = VideoGrid(2, 3, 4)
    for spec, image_tokens, per_token in (("tiny-wan2.1-i2v", 5, False), ("tiny-wan2.2-ti2v", 0, True)):
        model = surgery.load_model(spec)
        config = dict(model.config)
        pt, ph, pw = config["patch_size"]
        inputs = dict(
            hidden_states=torch.randn(1, config["in_channels"], grid.frames * pt, grid.height * ph, grid.width * pw),
            timestep=torch.full((1, grid.tokens) if per_token else (1,), 500.0),
            encoder_hidden_states=torch.randn(1, 512, config["text_dim"]),
        )
        if image_tokens:
            inputs["encoder_hidden_states_image"] = torch.randn(1, image_tokens, config["image_dim"])
        with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            model(**inputs)
        assert counter.get_total_flops() == forward_flops(config, grid, 512, image_tokens, per_token)["total"]


def test_two_expert_models_load_one_expert_at_a_time():
    high, low = surgery.load_model("tiny-wan2.2@transformer"), surgery.load_model("tiny-wan2.2@transformer_2")
    assert not torch.equal(high.blocks[0].attn1.to_q.weight, low.blocks[0].attn1.to_q.weight)
    assert timestep_band("tiny-wan2.2@transformer") == (0.875, 1.0)
    assert timestep_band("tiny-wan2.2@transformer_2") == (0.0, 0.875)
    assert list(model_info("tiny-wan2.2@transformer_2").experts) == ["transformer_2"]
    with pytest.raises(ModelLoadError, match="has two experts"):
        surgery.load_model("tiny-wan2.2")
    with pytest.raises(ModelLoadError, match="has one transformer"):
        surgery.load_model("tiny@transformer_2")


@pytest.mark.parametrize("spec", ["tiny-wan2.1-i2v", "tiny-wan2.2", "tiny-wan2.2-ti2v"])
def test_a_pipeline_folder_of_each_kind_reads_as_its_preset(spec, tmp_path):
    from surgery.pipeline import build_tiny_pipeline

    build_tiny_pipeline(spec=spec).save_pretrained(tmp_path / "pipe")
    folder, preset = str(tmp_path / "pipe"), model_kind(spec)
    kind = model_kind(folder)
    assert (kind.experts, kind.boundary_ratio, kind.image, kind.vae_scale, kind.expand_timesteps) == \
        (preset.experts, preset.boundary_ratio, preset.image, preset.vae_scale, preset.expand_timesteps)
    assert kind.image_tokens == preset.image_tokens
    assert fingerprint(surgery.load_config(folder)) == fingerprint(surgery.load_config(spec))
    name = f"{folder}@transformer_2" if kind.two_experts else folder
    built = surgery.load_model(f"{spec}@transformer_2" if kind.two_experts else spec)
    loaded = surgery.load_model(name)
    assert torch.equal(loaded.blocks[0].attn1.to_q.weight, built.blocks[0].attn1.to_q.weight)


def _image(path):
    from PIL import Image

    Image.fromarray(torch.arange(48 * 64 * 3).remainder(251).to(torch.uint8).reshape(48, 64, 3).numpy()).save(path)
    return path


def test_image_to_video_takes_an_image_and_text_to_video_refuses_one(tmp_path):
    from surgery.evaluate import evaluate, generate

    image = _image(tmp_path / "first.png")
    path, count = generate("tiny-wan2.1-i2v", "a red square", tmp_path / "i2v.gif", image=image, frames=5, height=32,
                           width=32, steps=1)
    assert count == 5 and path.is_file()
    report = evaluate("tiny-wan2.2-ti2v", "tiny-wan2.2-ti2v", image=image, samples=1, steps=2, frames=5, height=64,
                      width=64)
    assert report.velocity_error_mean == 0.0  # the teacher against itself, from the image's first frame
    cli = CliRunner()
    cases = [
        (["generate", "--model", "tiny-wan2.2-i2v", "--prompt", "a", "--out", str(tmp_path / "a.gif")],
         "is an image-to-video model: give its first frame with --image"),
        (["generate", "--model", "tiny-wan2.2", "--prompt", "a", "--image", str(image), "--out", str(tmp_path / "b.gif")],
         "is a text-to-video model: it takes no --image"),
        (["eval", "--model", "tiny-wan2.1-i2v", "--student", "tiny-wan2.1-i2v", "--image", str(tmp_path / "none.png")],
         "does not exist"),
        (["generate", "--model", "tiny-wan2.1-i2v", "--prompt", "a", "--image", str(tmp_path / "i2v.gif.txt"),
          "--out", str(tmp_path / "c.gif")], "does not exist"),
    ]
    for args, fragment in cases:
        result = cli.invoke(app, args)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert fragment in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.png", "i2v.gif"]


def test_an_image_to_video_export_is_a_pipeline_that_diffusers_loads_in_a_fresh_process(tmp_path):
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    from surgery.exporting import export_planned
    from surgery.plan import Plan

    plan = Plan.uniform("tiny-wan2.1-i2v", surgery.load_config("tiny-wan2.1-i2v"), "vsa", {"sparsity": 0.5})
    out = export_planned("tiny-wan2.1-i2v", plan, tmp_path / "exported")
    assert {"image_encoder", "image_processor", "vae", "transformer"} <= {p.name for p in out.iterdir()}
    image = _image(tmp_path / "first.png")
    script = textwrap.dedent(f"""
        import surgery  # diffusers loads components only from libraries already imported
        from diffusers import WanImageToVideoPipeline
        from PIL import Image
        pipe = WanImageToVideoPipeline.from_pretrained({str(out)!r})
        assert type(pipe.transformer).__name__ == "SurgeryWanTransformer3DModel"
        assert {{type(b.attn1.processor).__name__ for b in pipe.transformer.blocks}} == {{"VideoSparseAttention"}}, \\
            {{type(b.attn1.processor).__name__ for b in pipe.transformer.blocks}}
        frames = pipe(image=Image.open({str(image)!r}), prompt="a red square", num_frames=5, height=32, width=32,
                      num_inference_steps=1, output_type="np").frames
        print(list(frames.shape))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[1, 5, 32, 32, 3]"
