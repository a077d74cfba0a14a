"""Train the toy teacher (surgery/assets/toy) on procedural clips with rectified-flow matching.

    python scripts/train_toy_teacher.py            # one H100: ~8 minutes (7.3 training, compile
                                                   # included); writes the assets and
                                                   # docs/toy-teacher/{samples.png, loss.png, training.json}
    python scripts/train_toy_teacher.py --smoke --out /tmp/toy --report /tmp/report   # CPU, seconds

Every step renders a fresh batch of clips on the device (surgery.toy.sample_clips/render_clips,
the generator behind toy_dataset), so there is no dataset to store and no epoch to overfit.
The transformer and the caption embeddings train together; the EMA of both is what ships, with
the transformer's weights in bf16. The report ends with the direction scores
(surgery.toy.direction_scores): does the model follow the direction words?
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from surgery import toy  # noqa: E402
from surgery.wan import WEIGHTS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# One row of the sample grid each; the first is the acceptance prompt.
SAMPLE_PROMPTS = (
    "a red square bouncing left to right",
    "a blue circle moving top to bottom",
    "a yellow star rotating clockwise",
    "a green triangle moving right to left",
    "an orange cross rotating counterclockwise",
    "a purple circle bouncing right to left",
)
# --smoke: a 1-layer model on 4 frames of 32×32, a few steps, for CPU checks.
SMOKE = dict(config=dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, ffn_dim=32),
             frames=4, height=32, width=32, steps=3, batch=2, sample_steps=2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=toy.ASSET_DIR, help="asset folder to write")
    parser.add_argument("--report", type=Path, default=REPO / "docs" / "toy-teacher",
                        help="folder for samples.png and training.json")
    parser.add_argument("--steps", type=int, default=4500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped weights")
    parser.add_argument("--shift", type=float, default=3.0,
                        help="time shift of the training noise levels (the formula of surgery.toy.sample's)")
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty prompts, for guidance")
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the training forward (default: on CUDA only)")
    parser.add_argument("--direction-seeds", type=int, default=8,
                        help="clips per direction for the report's direction scores (surgery.toy.direction_scores)")
    parser.add_argument("--direction-every", type=int, default=500,
                        help="at logged steps that are multiples of N, score the EMA model's directions "
                             "(2 clips per direction); 0: never")
    parser.add_argument("--init", type=Path, help="continue from this asset folder's weights instead of random ones")
    parser.add_argument("--smoke", action="store_true", help="tiny model and clips, a few steps (CPU check)")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    """Train, write the assets and the report; return the logged loss rows."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = dict(toy.TRANSFORMER_CONFIG, **(SMOKE["config"] if args.smoke else {}))
    frames, height, width = (SMOKE["frames"], SMOKE["height"], SMOKE["width"]) if args.smoke else (
        toy.FRAMES, toy.HEIGHT, toy.WIDTH)
    steps, batch = (SMOKE["steps"], SMOKE["batch"]) if args.smoke else (args.steps, args.batch)
    torch.backends.cuda.matmul.allow_tf32 = True

    from diffusers import WanTransformer3DModel

    torch.manual_seed(args.seed)
    if args.init:
        model = WanTransformer3DModel.from_pretrained(args.init / "transformer", torch_dtype=torch.float32)
        encoder = toy.CaptionEncoder.load(args.init / "caption_encoder").requires_grad_(True)
    else:
        model = WanTransformer3DModel(**config)
        encoder = toy.CaptionEncoder(toy.caption_vocabulary())
    model, encoder = model.to(device).train(), encoder.to(device).train()
    ema_model = copy.deepcopy(model).requires_grad_(False).eval()
    ema_encoder = copy.deepcopy(encoder).requires_grad_(False).eval()
    params = [*model.parameters(), *encoder.parameters()]
    ema_params = [*ema_model.parameters(), *ema_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    warmup = min(args.warmup, steps)
    decay_steps = max(1, steps - warmup)

    def lr_factor(s: int) -> float:  # linear warm-up, then cosine to zero
        return (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / decay_steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    # Shapes never change, so one compilation serves every step.
    forward = torch.compile(model) if (device.type == "cuda" if args.compile is None else args.compile) else model
    noise_generator = torch.Generator(device).manual_seed(args.seed)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {steps} steps of {batch} clips "
          f"({frames}×{height}×{width}) on {device}", flush=True)

    sample_size = dict(frames=frames, height=height, width=width,
                       steps=SMOKE["sample_steps"] if args.smoke else toy.SAMPLE_STEPS)
    log, running, started = [], torch.zeros((), device=device), time.time()
    for step in range(steps):
        clips = toy.sample_clips(batch, toy.clip_generator(args.seed, step))
        x0 = toy.encode(toy.render_clips(clips, frames, height, width, device=device))  # [B, 12, F, H/2, W/2]
        keep = torch.rand(batch, generator=noise_generator, device=device) >= args.caption_dropout
        prompts = [caption if k else "" for caption, k in zip(clips.captions(), keep.tolist())]
        # Logit-normal t (SD3), time-shifted toward noise: a clip's layout and motion are decided at
        # high noise, where plain logit-normal puts few samples.
        u = torch.sigmoid(torch.randn(batch, generator=noise_generator, device=device))
        t = args.shift * u / (1 + (args.shift - 1) * u)
        noise = torch.randn(x0.shape, generator=noise_generator, device=device)
        xt = x0 + (noise - x0) * t.view(-1, 1, 1, 1, 1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            v = forward(toy.with_positions(xt), t * 1000, encoder(prompts), return_dict=False)[0]
        loss = F.mse_loss(v.float(), noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            # Short-horizon EMA early on, so the shipped weights never average in the random start.
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        running += loss.detach()
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            count = (step % args.log_every) + 1
            row = dict(step=step + 1, loss=running.item() / count, lr=schedule.get_last_lr()[0],
                       seconds=round(time.time() - started, 1))
            if args.direction_every and (step + 1) % args.direction_every == 0:
                # When does the model pick up the direction words? Scored on the weights that ship.
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    scores = toy.direction_scores(ema_model, ema_encoder, 2, **sample_size)
                row["direction_follows"] = {name: score["follows"] for name, score in scores.items()}
            log.append(row)
            running.zero_()
            print(json.dumps(row), flush=True)
    train_seconds = time.time() - started

    save_assets(ema_model, ema_encoder, args.out, frames, height, width)
    args.report.mkdir(parents=True, exist_ok=True)
    write_sample_grid(ema_model, ema_encoder, args.report / "samples.png", frames, height, width,
                      SMOKE["sample_steps"] if args.smoke else toy.SAMPLE_STEPS)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        directions = toy.direction_scores(ema_model, ema_encoder, 1 if args.smoke else args.direction_seeds,
                                          **sample_size)
    print(json.dumps(dict(directions=directions)), flush=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = dict(settings=settings, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  train_seconds=round(train_seconds, 1), video=[frames, height, width], log=log,
                  directions=directions)
    (args.report / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    write_loss_curve(log, args.report / "loss.png")
    return log


def save_assets(model, encoder, folder: Path, frames: int, height: int, width: int) -> None:
    """Diffusers-format transformer (bf16 weights), caption encoder, and the codec facts."""
    from safetensors.torch import save_file

    (folder / "transformer").mkdir(parents=True, exist_ok=True)
    model.save_config(folder / "transformer")
    # bf16 halves the file (the package ships it); loading without a dtype gives float32 again.
    state = {name: tensor.detach().to(torch.bfloat16).cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, folder / "transformer" / WEIGHTS, metadata={"format": "pt"})
    encoder.save(folder / "caption_encoder")
    facts = dict(
        frames=frames, height=height, width=width, latent_scale=list(toy.LATENT_SCALE),
        latent_channels=toy.LATENT_CHANNELS,
        codec=f"pixel_unshuffle({toy.LATENT_SCALE[1]}) of RGB scaled to [-1, 1]; no VAE (surgery.toy.encode)",
        text="caption_encoder/: word + position embeddings [max_words, text_dim], zero padding",
        objective="rectified flow: x_t = (1 - t) x0 + t eps, predicts eps - x0 at timestep t * 1000",
        sampler=dict(steps=toy.SAMPLE_STEPS, guidance_scale=toy.GUIDANCE_SCALE, shift=toy.SHIFT),
    )
    (folder / "toy.json").write_text(json.dumps(facts, indent=1) + "\n")


def write_sample_grid(model, encoder, path: Path, frames: int, height: int, width: int, steps: int) -> torch.Tensor:
    """One row per SAMPLE_PROMPTS entry (seed = row), every other frame left to right, sampler defaults.
    Returns the clips, uint8 [prompts, F, H, W, 3]."""
    import imageio.v3 as iio

    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
        rows = [toy.sample(model, encoder, prompt, seed=i, steps=steps, frames=frames, height=height, width=width)
                for i, prompt in enumerate(SAMPLE_PROMPTS)]
    clips = torch.stack(rows)
    grid = clips[:, ::2]  # [rows, F/2, H, W, 3]
    grid = grid.permute(0, 2, 1, 3, 4).flatten(2, 3).flatten(0, 1)  # [rows·H, F/2·W, 3]
    # Nearest-neighbour 2× so that 48-pixel frames can be seen.
    iio.imwrite(path, grid.repeat_interleave(2, 0).repeat_interleave(2, 1).cpu().numpy())
    print(f"wrote {path}: rows = {list(SAMPLE_PROMPTS)}", flush=True)
    return clips


def write_loss_curve(log: list[dict], path: Path, width: int = 640, height: int = 360) -> None:
    """The logged loss against the step (log scale, blue) and, where scored, the share of clips that
    follow their direction words (0–100%, orange dots), as a PNG."""
    from PIL import Image, ImageDraw

    left, right, top, bottom = 60, width - 50, 20, height - 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    steps = [row["step"] for row in log]
    losses = [math.log10(row["loss"]) for row in log]
    low, high = math.floor(min(losses)), math.ceil(max(losses))
    high = max(high, low + 1)
    x = lambda step: left + (right - left) * step / max(steps)
    y_loss = lambda value: bottom - (bottom - top) * (value - low) / (high - low)
    y_share = lambda share: bottom - (bottom - top) * share
    draw.rectangle((left, top, right, bottom), outline="black")
    for decade in range(low, high + 1):
        draw.text((8, y_loss(decade) - 6), f"1e{decade}", fill="black")
    for share in (0.0, 0.5, 1.0):
        draw.text((right + 6, y_share(share) - 6), f"{share:.0%}", fill="darkorange")
    for step in (0, max(steps) // 2, max(steps)):
        draw.text((x(step) - 12, bottom + 6), str(step), fill="black")
    draw.text((left, bottom + 22), "step; blue: training loss (log scale), orange: direction words followed",
              fill="black")
    draw.line([(x(s), y_loss(v)) for s, v in zip(steps, losses)], fill="royalblue", width=2)
    for row in log:
        if "direction_follows" in row:
            cx, cy = x(row["step"]), y_share(row["direction_follows"]["all"])
            draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill="darkorange")
    image.save(path)


if __name__ == "__main__":
    main()
