"""Does the toy teacher follow the direction words? Sample translating prompts and track the shape.

`surgery.toy.direction_scores`: for every translating motion and direction ("moving" × 4,
"bouncing" × 2), sample `--seeds` clips with the shipped sampler defaults, track the shape and count
the clips that travelled more than `--min-travel` of the frame the prompt's way.

    python scripts/toy_directions.py [--model toy] [--seeds 8] [--steps 24] [--json PATH]   # GPU: seconds

--model is any spec `surgery.load_model` takes: `toy`, a transformer folder (a training run's
OUT/toy/transformer, with --captions OUT/toy/caption_encoder) or a retrofitted export of the toy
(`vsurgery export`), which shows whether surgery kept the teacher's grip on the words.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from surgery import toy  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", help="a model spec (surgery.load_model)")
    parser.add_argument("--captions", type=Path, default=toy.ASSET_DIR / "caption_encoder",
                        help="the caption encoder folder")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=toy.SAMPLE_STEPS, help="sampler steps per clip")
    parser.add_argument("--min-travel", type=float, default=0.15, help="fraction of the frame")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from surgery import load_model

    model = load_model(args.model, device=device)
    encoder = toy.CaptionEncoder.load(args.captions).to(device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        scores = toy.direction_scores(model, encoder, args.seeds, args.min_travel, steps=args.steps)
    for name, row in scores.items():
        print(f"{name:32s} follows {row['follows']:.0%}" +
              (f", mean travel {row['mean_travel']:+.2f}" if "mean_travel" in row else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps(scores, indent=1) + "\n")
    return scores


if __name__ == "__main__":
    main()
