"""Where along the sampling trajectory a student's video leaves its teacher's, on the toy teacher.

For each handover step n, two hybrid samplers from the same starts: the teacher takes the first n Euler
steps and the student the rest ("student from step n"), and the other way round ("teacher from step n").
Each decoded video is scored by PSNR against the teacher's own. If handing the last steps to the student
costs little while handing it the first ones costs much, the student's errors at high noise (where a
clip's layout and motion are decided) are what distillation must remove. Captions are bench/quality.py's
held-out ones (seed 100), so the figures sit beside the quality front's.

    python scripts/toy_handover.py --student runs/toy/exported [--samples 4] [--steps 8] [--at 0,1,2,4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Handover:
    """Calls `first` for the first `at` denoising steps, then `second`: a model as `sample_latents` uses one."""

    def __init__(self, first, second, at: int):
        self.first, self.second, self.at, self.calls = first, second, at, 0
        self.config, self.patch_embedding = first.config, first.patch_embedding

    def __call__(self, **inputs):
        model = self.first if self.calls < self.at else self.second
        self.calls += 1
        return model(**inputs)


@torch.no_grad()
def handover_psnr(teacher, student, starts: list[dict], steps: int, at: list[int], decode) -> dict[str, float]:
    """{"student from step n": mean PSNR, "teacher from step n": …} for each n in `at`, against the teacher's
    own videos from `starts` (`surgery.trajectories.sampling_starts`)."""
    from surgery.metrics import psnr
    from surgery.trajectories import sample_latents

    def video(model, start):
        return decode(sample_latents(model, steps=steps, **start)[0].cpu())[0]

    references = [video(teacher, start) for start in starts]
    scores = {}
    for n in at:
        for label, first, second in (("student", teacher, student), ("teacher", student, teacher)):
            values = [psnr(reference, video(Handover(first, second, n), start))
                      for reference, start in zip(references, starts)]
            scores[f"{label} from step {n}"] = sum(values) / len(values)
    return scores


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, help="an export folder of a toy student")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--at", default="0,1,2,4,6", help="handover steps")
    parser.add_argument("--recipe", default="mixed", help="the recipe whose training captions are held out")
    args = parser.parse_args()

    from bench.quality import held_out_captions, training_captions
    from surgery.loading import load_model
    from surgery.model import resolve_grid
    from surgery.recipe import load_recipe
    from surgery.toy import decode_unit
    from surgery.trajectories import sampling_starts

    recipe = load_recipe(args.recipe, ["data.source=toy"])
    prompts = held_out_captions("toy", recipe, args.samples, 100, training_captions(recipe, recipe.plan.samples))
    teacher, student = load_model("toy"), load_model(args.student)
    grid = resolve_grid("toy", dict(teacher.config))
    starts, _ = sampling_starts(teacher, "toy", grid, len(prompts), 100, prompts)
    at = [int(n) for n in args.at.split(",")]
    scores = handover_psnr(teacher, student, starts, args.steps, at, decode_unit)
    print("| handover step | student from it | teacher from it |\n|---:|---:|---:|")
    for n in at:
        print(f"| {n} | {scores[f'student from step {n}']:.2f} dB | {scores[f'teacher from step {n}']:.2f} dB |")


if __name__ == "__main__":
    main()
