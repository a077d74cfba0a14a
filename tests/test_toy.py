"""The toy teacher: procedural clips and their captions, the pixel codec, the caption encoder, the
shipped weights behind `load_model("toy")`, and the training script's smoke mode."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

import surgery
from surgery import toy
from surgery.toy.teacher import load_toy
from surgery.grid import VideoGrid
from surgery.model import default_video, resolve_grid

REPO = Path(__file__).resolve().parents[1]
SYMMETRY = {"square": 4, "triangle": 3, "star": 5, "cross": 4}  # k-fold: the angle harmonic that tracks a turn


@pytest.fixture(scope="module")
def shipped():
    return load_toy()


def _dataset(tmp_path, num_clips, seed, **size):
    # A fresh cache each time, so every call renders rather than reading an earlier run's rows.
    dataset = toy.toy_dataset(num_clips, seed=seed, cache_dir=str(tmp_path / f"{num_clips}-{seed}"), **size)
    assert dataset.features["video"].dtype == "uint8"
    return dataset.with_format("numpy", dtype=np.uint8)[:]  # numpy/torch formats widen integers unless told


def test_dataset_is_deterministic_per_seed_and_a_prefix_of_longer_ones(tmp_path):
    size = dict(frames=4, height=32, width=32)
    short, long, other = (_dataset(tmp_path, n, seed, **size) for n, seed in ((3, 7), (20, 7), (3, 8)))
    assert short["video"].dtype == np.uint8 and short["video"].shape == (3, 4, 32, 32, 3)
    np.testing.assert_array_equal(short["video"], long["video"][:3])
    assert list(short["caption"]) == list(long["caption"][:3])
    assert not np.array_equal(short["video"], other["video"])


def _turn_per_frame(masks, centres, xs, ys, k):
    """Mean change per frame of the phase of the k-th angular harmonic of the shape, radians/k."""
    phases = [
        np.angle(np.exp(1j * k * np.arctan2(ys[m] - cy, xs[m] - cx)).sum()) for m, (cx, cy) in zip(masks, centres)
    ]
    return np.mean(np.angle(np.exp(1j * np.diff(phases)))) / k


def test_captions_match_the_rendered_motion(tmp_path):
    size = 64
    data = _dataset(tmp_path, 48, 3, frames=8, height=size, width=size)
    seen = set()
    for video, caption, colour, shape, motion, direction in zip(
        data["video"], data["caption"], data["colour"], data["shape"], data["motion"], data["direction"]
    ):
        assert caption.endswith(f"{colour} {shape} {motion} {direction}")
        centres, masks = (t.numpy() for t in toy.shape_track(torch.from_numpy(video)))
        ys, xs = np.mgrid[:size, :size]
        mean_rgb = video[masks].mean(0) / 255
        assert colour == min(toy.COLOURS, key=lambda name: np.abs(np.array(toy.COLOURS[name]) - mean_rgb).sum())
        travel = centres[-1] - centres[0]
        if motion == "rotating":
            assert np.abs(centres - centres[0]).max() < 1.5, caption
            turn = _turn_per_frame(masks, centres, xs, ys, SYMMETRY[shape])
            # y points down, so a growing angle is clockwise on screen
            assert (turn > 0) == (direction == "clockwise") and abs(turn) > math.radians(5), (caption, turn)
        else:
            axis, sign = toy.TRAVEL_AXES[direction]
            assert sign * travel[axis] > 0.4 * size, caption
            assert toy.travel(torch.from_numpy(video), direction) > 0.3, caption
            across = centres[:, 1 - axis]
            if motion == "bouncing":
                assert across.max() - across.min() > 0.1 * size, caption
            else:
                assert across.max() - across.min() < 1.5, caption
        seen.add((motion, direction))
    assert len(seen) == 8  # every motion with every direction it allows


def test_rendering_is_deterministic_and_caption_parts_come_from_the_vocabulary():
    params = toy.sample_clips(4, torch.Generator().manual_seed(1))
    again = toy.sample_clips(4, torch.Generator().manual_seed(1))
    assert torch.equal(toy.render_clips(params, 3, 32, 32), toy.render_clips(again, 3, 32, 32))
    vocabulary = set(toy.caption_vocabulary())
    assert all(set(caption.split()) <= vocabulary for caption in params.captions())


def test_codec_round_trips_exactly():
    video = torch.randint(0, 256, (2, 3, 8, 12, 3), dtype=torch.uint8)
    latents = toy.encode(video)
    assert latents.shape == (2, toy.LATENT_CHANNELS, 3, 4, 6)
    assert latents.min() >= -1 and latents.max() <= 1
    assert torch.equal(toy.decode(latents), video)
    with pytest.raises(surgery.SurgeryError, match="divisible by 2"):
        toy.encode(video[:, :, :7])


def test_caption_encoder(shipped):
    _, encoder = shipped
    text = encoder(["a red square bouncing left to right", "a red square bouncing right to left", ""])
    assert text.shape == (3, toy.MAX_WORDS, toy.TEXT_DIM)
    assert not torch.equal(text[0], text[1])  # word order is seen
    assert torch.equal(text[2], torch.zeros_like(text[2]))  # the unconditional prompt
    assert torch.equal(text[0, 7:], torch.zeros_like(text[0, 7:]))  # zero padding after 7 words
    with pytest.raises(surgery.SurgeryError, match="does not know 'dog'"):
        encoder(["a red dog moving left to right"])
    with pytest.raises(surgery.SurgeryError, match="at most 8"):
        encoder(["a red square moving left to right to right"])


def test_caption_encoder_round_trips_and_refuses_incomplete_files(tmp_path):
    encoder = toy.CaptionEncoder(toy.caption_vocabulary())
    with torch.no_grad():
        encoder.word_at_position.normal_()  # a trained encoder's order embeddings are not zero
    encoder.save(tmp_path / "enc")
    prompts = ["a red square bouncing left to right", "a red square bouncing right to left"]
    assert torch.equal(toy.CaptionEncoder.load(tmp_path / "enc")(prompts), encoder(prompts).detach())
    from safetensors.torch import save_file

    save_file({"words": encoder.words.detach(), "positions": encoder.positions.detach()},
              tmp_path / "enc" / "embeddings.safetensors")
    with pytest.raises(surgery.SurgeryError, match="cannot load the caption encoder.*word_at_position"):
        toy.CaptionEncoder.load(tmp_path / "enc")


def test_shipped_toy_loads_and_runs(shipped):
    model, encoder = shipped
    assert isinstance(model, WanTransformer3DModel) and model.dtype == torch.float32  # bf16 file, fp32 model
    config = model.config
    loaded = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in toy.TRANSFORMER_CONFIG}
    assert loaded == toy.TRANSFORMER_CONFIG == surgery.load_config("toy")
    assert default_video("toy") == (toy.FRAMES, toy.HEIGHT, toy.WIDTH)
    assert resolve_grid("toy", surgery.load_config("toy")) == VideoGrid(16, 12, 12)
    with torch.no_grad():
        latents = toy.encode(torch.zeros(1, 2, 32, 32, 3, dtype=torch.uint8))
        text = encoder(["a blue circle moving top to bottom"])
        out = model(toy.with_positions(latents), torch.tensor([500.0]), text, return_dict=False)[0]
    assert out.shape == latents.shape and torch.isfinite(out).all()
    video = toy.sample(model, encoder, "a red square moving left to right", seed=1, steps=2, frames=2, height=32,
                       width=32)
    assert video.shape == (2, 32, 32, 3) and video.dtype == torch.uint8


def test_shipped_toy_follows_the_direction_words(shipped):
    # The acceptance prompt and its mirror, same seed: the words, not the noise, decide the way.
    model, encoder = shipped
    for direction in ("left to right", "right to left"):
        video = toy.sample(model, encoder, f"a red square bouncing {direction}", seed=0, steps=12)
        assert toy.travel(video, direction) > 0.25, direction


def test_the_product_feeds_the_toy_its_own_clips_and_captions(tmp_path):
    from surgery.evaluate import evaluate
    from surgery.recipe import DataSection
    from surgery.sensitivity import calibration_inputs
    from surgery.data import build_dataset

    config = surgery.load_config("toy")
    grid = resolve_grid("toy", config)
    # Distillation data (source "toy"): encoded clips of the teacher's generator with their captions.
    rows = build_dataset(DataSection(source="toy", samples=2), config, grid, toy.MAX_WORDS, seed=3)[:]
    clips = _dataset(tmp_path, 2, 3)
    assert torch.equal(rows["latents"], toy.encode(torch.from_numpy(clips["video"])))
    assert torch.equal(rows["text_embeddings"], toy.caption_embeddings(clips["caption"]))
    with pytest.raises(surgery.SurgeryError, match="use it with --model toy"):
        tiny = surgery.load_config("tiny")
        build_dataset(DataSection(source="toy", samples=2), tiny, resolve_grid("tiny", tiny), 16, seed=0)
    # Planner calibration: the same kind of inputs, noised, with the position channels appended.
    model, _ = load_toy()
    inputs = calibration_inputs(model, grid, 2, 3, toy.MAX_WORDS)
    assert inputs[0]["hidden_states"].shape[1] == toy.LATENT_CHANNELS + toy.POSITION_CHANNELS
    assert torch.equal(inputs[1]["encoder_hidden_states"][0], rows["text_embeddings"][1])
    # eval samples from captions and compares decoded video; the teacher against itself is exact.
    report = evaluate("toy", "toy", samples=1, steps=1)
    assert report.compared_on == "decoded video" and report.prompts[0].split()[0] in ("a", "an")
    assert report.velocity_error_mean == 0 and report.psnr_db == math.inf


def test_direction_script_scores_a_model_spec(tmp_path):
    spec = importlib.util.spec_from_file_location("toy_directions", REPO / "scripts" / "toy_directions.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    scores = script.main(["--model", "toy", "--seeds", "1", "--steps", "1", "--json", str(tmp_path / "d.json")])
    assert set(scores) == {f"{motion} {direction}" for motion, direction in toy.TRANSLATIONS} | {"all"}
    written = json.loads((tmp_path / "d.json").read_text())  # mean travel may be NaN: compare shares
    assert {name: row["follows"] for name, row in written.items()} == {n: r["follows"] for n, r in scores.items()}


def test_training_smoke_mode_runs_and_writes_loadable_assets(tmp_path):
    spec = importlib.util.spec_from_file_location("train_toy_teacher", REPO / "scripts" / "train_toy_teacher.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    log = train.main(
        ["--smoke", "--log-every", "1", "--direction-every", "2", "--out", str(tmp_path / "toy"),
         "--report", str(tmp_path / "report")]
    )
    assert len(log) == train.SMOKE["steps"] and all(math.isfinite(row["loss"]) for row in log)
    assert [row["step"] for row in log if "direction_follows" in row] == [2]
    report = json.loads((tmp_path / "report" / "training.json").read_text())
    assert set(report["directions"]) == {f"{motion} {direction}" for motion, direction in toy.TRANSLATIONS} | {"all"}
    model = surgery.load_model(str(tmp_path / "toy" / "transformer"))
    assert model.config.num_layers == train.SMOKE["config"]["num_layers"]
    assert toy.CaptionEncoder.load(tmp_path / "toy" / "caption_encoder").vocabulary == toy.caption_vocabulary()
    assert (tmp_path / "report" / "samples.png").stat().st_size > 0
    assert (tmp_path / "report" / "loss.png").stat().st_size > 0
    # A continuation starts from the written weights.
    log = train.main(["--smoke", "--init", str(tmp_path / "toy"), "--out", str(tmp_path / "more"),
                      "--report", str(tmp_path / "report")])
    assert math.isfinite(log[-1]["loss"])
