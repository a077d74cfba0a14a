"""How far can a linear-attention feature map get on a model's self-attention? A polynomial yardstick.

Linear attention replaces the kernel exp(q·k/√d) by φ(q)·φ(k). A polynomial feature map of degree n
needs every monomial of q up to degree n, C(d + n, n) features (d = head dim), to reproduce a
degree-n polynomial in q·k. So the share of the kernel's variance (over the layer's query-key pairs)
that the best degree-n polynomial in x = q·k/√d explains is what maps of that size can reach; the
rest, 1 − share, is the squared relative error they keep. For x ~ N(0, 1) the shares are
Σ_{i≤n} 1/i! / (e − 1): 58%, 87%, 97%, 99.4% (the Hermite expansion of e^x).

For each self-attention layer of `--model`, over `--samples` calibration inputs (those `vsurgery plan`
uses: random latents and text for random-weight models), the script prints the std of x and the
shares for degrees 1–4 (least squares on a subsample of the pairs), with the features each needs.

    python scripts/attention_kernel_degree.py [--model tiny] [--samples 4]   # CPU, seconds
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from surgery import load_model  # noqa: E402
from surgery.capture import tap_self_attention  # noqa: E402
from surgery.model import default_text_tokens, resolve_grid  # noqa: E402
from surgery.sensitivity import calibration_inputs  # noqa: E402

DEGREES = (1, 2, 3, 4)
PAIRS = 200_000  # pairs per layer and input for the fit: plenty for four coefficients


def explained_shares(x: torch.Tensor) -> list[float]:
    """Share of Var(exp(x)) explained by the best polynomial in x of each degree in DEGREES."""
    w = x.exp()
    shares = []
    for degree in DEGREES:
        powers = torch.stack([x**i for i in range(degree + 1)], 1)
        fit = powers @ torch.linalg.lstsq(powers, w[:, None]).solution
        shares.append(1 - ((w - fit[:, 0]).var() / w.var()).item())
    return shares


def main(argv=None) -> dict[int, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args(argv)
    model = load_model(args.model).eval()
    grid = resolve_grid(args.model, model.config)
    inputs = calibration_inputs(model, grid, args.samples, 0, default_text_tokens(args.model))
    head_dim = model.config.attention_head_dim
    rows: dict[int, list[list[float]]] = {}

    def measure(layer, q, k, v, x, y, grid):
        logits = torch.einsum("bshd,bthd->bhst", q.double(), k.double()).flatten() / math.sqrt(q.shape[-1])
        pick = torch.randperm(logits.numel(), generator=torch.Generator().manual_seed(layer))[:PAIRS]
        rows.setdefault(layer, []).append([logits[pick].std().item(), *explained_shares(logits[pick])])

    with torch.no_grad(), tap_self_attention(model, measure):
        for model_inputs in inputs:
            model(**model_inputs)
    needs = ", ".join(f"{n}: {math.comb(head_dim + n, n):,}" for n in DEGREES)
    print(f"{args.model}: head dim {head_dim}; features a degree-n polynomial kernel needs: {needs}")
    print("| layer | std of q·k/√d | " + " | ".join(f"degree {n}" for n in DEGREES) + " |")
    print("|---|---|" + "---|" * len(DEGREES))
    means = {}
    for layer, per_input in sorted(rows.items()):
        means[layer] = torch.tensor(per_input).mean(0).tolist()
        std, *shares = means[layer]
        print(f"| {layer} | {std:.2f} | " + " | ".join(f"{s:.1%}" for s in shares) + " |")
    return means


if __name__ == "__main__":
    main()
