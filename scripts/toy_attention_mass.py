"""How concentrated is the toy teacher's self-attention? Trained vs the same architecture untrained.

For every layer and head: cut the token grid into 4×4×4 tiles; for each query tile, sum its queries'
attention mass per key tile, sort the key tiles by that mass and keep the top ceil(12.5% of tiles);
report the share of attention mass they hold, averaged over all queries. A uniform pattern scores
about 12.5%; the block-sparse variants (vsa, vmoba) keep roughly this much of a layer's attention.
q and k are taken after Wan's RMS norms and rotary embedding (surgery.capture taps).

    python scripts/toy_attention_mass.py [--clips 4] [--noise 0.3 0.6 0.9] [--json PATH]   # CPU, ~1 min
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from surgery import load_config, toy  # noqa: E402
from surgery.capture import tap_self_attention  # noqa: E402
from surgery.grid import VideoGrid, block_layout  # noqa: E402
from surgery.model import resolve_grid  # noqa: E402
from surgery.toy.teacher import load_toy  # noqa: E402

TILE = (4, 4, 4)
KEEP = 0.125


def top_tile_share(q: torch.Tensor, k: torch.Tensor, grid: VideoGrid) -> torch.Tensor:
    """q, k [B, S, H, D] → [H]: share of attention mass in each query tile's top key tiles, mean over queries."""
    layout = block_layout(grid, TILE, q.device)
    top = math.ceil(KEEP * layout.num_blocks)
    member = F.one_hot(layout.block_of_token, layout.num_blocks).to(q.dtype)  # [S, tiles]
    shares = []
    for head in range(q.shape[2]):
        logits = q[:, :, head] @ k[:, :, head].transpose(1, 2) / math.sqrt(q.shape[-1])
        tile_mass = member.T @ (logits.softmax(-1) @ member)  # [B, query tiles, key tiles]
        shares.append(tile_mass.topk(top, dim=-1).values.sum((1, 2)) / q.shape[1])  # [B]
    return torch.stack(shares, 1).mean(0)


def measure(model, latents: torch.Tensor, noise: torch.Tensor, text: torch.Tensor, t: float) -> list[list[float]]:
    """[layer][head] top-tile share with `model` denoising `latents` at noise level t."""
    per_layer = {}

    def record(layer, q, k, v, x, y, grid):
        per_layer[layer] = top_tile_share(q.float(), k.float(), grid).tolist()

    xt = latents + (noise - latents) * t
    with torch.no_grad(), tap_self_attention(model, record):
        model(toy.with_positions(xt), torch.full((len(xt),), t * 1000), text, return_dict=False)
    return [per_layer[layer] for layer in sorted(per_layer)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.3, 0.6, 0.9], help="noise levels t")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    from diffusers import WanTransformer3DModel

    trained, encoder = load_toy()
    torch.manual_seed(args.seed)
    untrained = WanTransformer3DModel(**load_config("toy")).eval()  # diffusers' default initialisation
    generator = torch.Generator().manual_seed(args.seed)
    clips = toy.sample_clips(args.clips, generator)
    latents = toy.encode(toy.render_clips(clips))
    noise = torch.randn(latents.shape, generator=generator)
    text = encoder(clips.captions())

    grid = resolve_grid("toy", load_config("toy"))
    tiles = block_layout(grid, TILE).num_blocks
    results = dict(
        grid=str(grid), tile=list(TILE), tiles=tiles, top_tiles=math.ceil(KEEP * tiles), clips=args.clips,
        noise=args.noise,
        trained={str(t): measure(trained, latents, noise, text, t) for t in args.noise},
        untrained={str(t): measure(untrained, latents, noise, text, t) for t in args.noise},
    )
    print(markdown_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


def markdown_table(results: dict) -> str:
    noise = [str(t) for t in results["noise"]]
    header = ["layer.head", *(f"trained t={t}" for t in noise), *(f"untrained t={t}" for t in noise)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    layers = results["trained"][noise[0]]
    for layer in range(len(layers)):
        for head in range(len(layers[layer])):
            cells = [results[m][t][layer][head] for m in ("trained", "untrained") for t in noise]
            lines.append(f"| {layer}.{head} | " + " | ".join(f"{c:.1%}" for c in cells) + " |")
    means = [
        sum(sum(heads) for heads in results[m][t]) / sum(len(heads) for heads in results[m][t])
        for m in ("trained", "untrained") for t in noise
    ]
    lines.append("| **mean** | " + " | ".join(f"**{c:.1%}**" for c in means) + " |")
    uniform = results["top_tiles"] / results["tiles"]
    lines.append(f"\nGrid {results['grid']} tokens, {results['tiles']} tiles of {results['tile']}, top "
                 f"{results['top_tiles']} kept (uniform attention: {uniform:.1%}); {results['clips']} clips.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
