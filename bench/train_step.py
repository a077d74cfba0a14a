"""One stage-1 and one stage-2 training step of a full-size Wan model on one GPU: time and peak memory.

    python bench/train_step.py [--model wan2.1-t2v-1.3b] [--variant hybrid --params '{"rate": 8}']
                               [--frames 81 --height 480 --width 832]

Random weights (timing and memory do not depend on their values), bf16, the library's own stage
step functions (surgery.train.distill), gradient checkpointing in stage 2, LoRA on the default
targets. Prints one line per stage; BENCHMARKS.md, "Training steps", records them with device and versions.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from surgery.loading import load_config, load_model
from surgery.model import conditioner, default_text_tokens, resolve_grid
from surgery.wan import latent_channels
from surgery.plan import Plan
from surgery.recipe import load_recipe
from surgery.data import StepSampler
from surgery.train.distill import stage1_step_fn, stage2_step_fn, build_student, trainable


class NoiseSamples:
    """The self-distillation set of `surgery.data` without the `datasets` dependency (absent on the GPU box)."""

    def __init__(self, config, grid, text_tokens, samples=2):
        pt, ph, pw = config["patch_size"]
        g = torch.Generator().manual_seed(0)
        shape = (samples, latent_channels(config), grid.frames * pt, grid.height * ph, grid.width * pw)
        self.latents = torch.randn(*shape, generator=g)
        self.text = torch.randn(samples, text_tokens, config["text_dim"], generator=g)

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, rows):
        return {"latents": self.latents[rows], "text_embeddings": self.text[rows]}


def timed(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="wan2.1-t2v-1.3b")
    parser.add_argument("--variant", default="hybrid")
    parser.add_argument("--params", default='{"rate": 8}')
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    args = parser.parse_args()

    from accelerate import Accelerator

    config = load_config(args.model)
    grid = resolve_grid(args.model, config, args.frames, args.height, args.width)
    plan = Plan.uniform(args.model, config, args.variant, json.loads(args.params))
    plan.grid = grid
    recipe = load_recipe("hybrid", ["train.gradient_checkpointing=true"])
    teacher = load_model(args.model, device="cuda", dtype=torch.bfloat16)
    teacher.requires_grad_(False)
    samples = NoiseSamples(config, grid, default_text_tokens(args.model))
    device, dtype = torch.device("cuda"), torch.bfloat16
    print(f"{args.model} grid {grid} ({grid.tokens} tokens), plan: {args.variant} {args.params} on every layer")

    student = build_student(teacher, plan, recipe, stage=1)
    step1, _ = stage1_step_fn(teacher, student, StepSampler(samples, 1, 0, 1, condition=conditioner(config)), device, dtype)
    for step in range(2):  # the first includes one-off compilation and allocation
        seconds, peak = timed(lambda: step1(step))
    print(f"stage 1 step: {seconds:.2f} s, peak {peak:.1f} GiB, {sum(p.numel() for p in trainable(student).values()):,} trainable")
    del student

    accelerator = Accelerator(mixed_precision="bf16")
    student = build_student(teacher, plan, recipe, stage=2).train()
    student = accelerator.prepare(student)
    step2 = stage2_step_fn(teacher, student, StepSampler(samples, 1, 0, 2, condition=conditioner(config)), recipe, device, dtype, plan, accelerator)
    for step in range(2):
        seconds, peak = timed(lambda: step2(step))
    print(f"stage 2 step (LoRA, gradient checkpointing): {seconds:.2f} s, peak {peak:.1f} GiB, "
          f"{sum(p.numel() for p in trainable(student).values()):,} trainable")


if __name__ == "__main__":
    main()
