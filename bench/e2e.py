"""Whole-model speed of retrofitted Wan2.1 on one GPU: what a user gets per denoising step and per video.

In one process, on one model (a preset with random bf16 weights: latency does not depend on weight values):
the stock step (SDPA default and cuDNN), the step with the attention core skipped (the ceiling), and the
step of each plan — FLOP-planned at the given budgets, the fastest plan the latency-aware planner makes,
and for each budget b the latency planner's plan at ideal(b)'s step time — each beside ideal(b)
(surgery/benchmark.py; for the latency plans at ideal(b), b is that budget, not their FLOPs). Planning is
timed (one calibration for all the FLOP budgets, one for all the latency plans), with its peak memory.
--video adds whole generations (text encoder, 50 steps with guidance, VAE decode) of the stock model and of
one plan; --compile compiles the blocks first (and the latency planner times compiled steps).

    python bench/e2e.py --model wan2.1-t2v-1.3b --budgets 0.5,0.3,0.15 --out e2e-480p.json
    python bench/e2e.py --model wan2.1-t2v-1.3b --height 720 --width 1280 --budgets 0.5,0.3,0.15 --out e2e-720p.json
    python bench/e2e.py --model wan2.1-t2v-1.3b --budgets 0.15 --video --video-plan fastest --out e2e-video.json
    python bench/e2e.py --model wan2.1-t2v-1.3b --budgets 0.15 --compile --out e2e-compiled.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery.benchmark import (  # noqa: E402
    SKIPPED, STOCK, STOCK_CUDNN, STUDENT, _attention_flops_ratio, _time_videos, device_name, planned_processors,
    software_versions, step_inputs, time_step, yardsticks,
)
from surgery.loading import load_model  # noqa: E402
from surgery.model import resolve_grid  # noqa: E402
from surgery.errors import SurgeryError  # noqa: E402
from surgery.planner import FASTEST, calibrate, make_plans, solve_plan  # noqa: E402
from surgery.swap import install_processors, self_attention_modules  # noqa: E402
from surgery.timing import attention_core_skipped, compile_blocks, peak_memory, warmup_calls  # noqa: E402


def variant_counts(plan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for choice in plan.layers.values():
        counts[choice.variant] = counts.get(choice.variant, 0) + 1
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wan2.1-t2v-1.3b")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--budgets", default="0.5,0.3,0.15", help="FLOP budgets to plan and time")
    parser.add_argument("--variants", default=None, help="candidate variants (default: all)")
    parser.add_argument("--no-fastest", action="store_true", help="skip the latency-planned fastest plan")
    parser.add_argument("--samples", type=int, default=2, help="calibration inputs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--video", action="store_true")
    parser.add_argument("--video-steps", type=int, default=50)
    parser.add_argument("--video-plan", default="fastest", help="which plan's video to time: fastest or a budget")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    variants = args.variants.split(",") if args.variants else None
    budgets = [float(b) for b in args.budgets.split(",") if b]
    report = {"model": args.model, "device": device_name(device), "versions": software_versions(device),
              "compiled": args.compile, "repeats": args.repeats}

    model = load_model(args.model, device=device, dtype=dtype)
    grid = resolve_grid(args.model, dict(model.config), args.frames, args.height, args.width)
    report |= {"grid": grid.to_dict(), "tokens": grid.tokens}
    common = dict(variants=variants, frames=args.frames, height=args.height, width=args.width, samples=args.samples,
                  model=model)

    plans = {}
    began = time.perf_counter()
    with peak_memory(device) as memory:
        for budget, plan in zip(budgets, make_plans(args.model, budgets, **common)):
            plans[f"flops {budget:g}"] = plan
    report["planning"] = {"budgets": budgets, "seconds": time.perf_counter() - began, "peak_gib": memory["gib"],
                          "samples": args.samples}
    matched = {}  # latency plan name → the FLOP budget b whose ideal(b) step time it is planned to
    if not args.no_fastest and device.type == "cuda":
        began = time.perf_counter()
        context = calibrate(args.model, cost="latency", compiled=args.compile, **common)
        plans["latency fastest"] = solve_plan(context, FASTEST)
        # The step time ideal(b) stands for, as a latency budget: the planner's own attention-free step plus
        # b of its dense attention time.
        stock_ms, fixed_ms = context["latency"]["stock_step_ms"], context["latency"]["skipped_attention_step_ms"]
        for budget in budgets:
            name = f"latency at ideal({budget:g})"
            try:
                plans[name] = solve_plan(context, (fixed_ms + budget * (stock_ms - fixed_ms)) / stock_ms)
                matched[name] = budget
            except SurgeryError as e:
                print(f"{name}: {e}", flush=True)
        report["planning"]["latency_seconds"] = time.perf_counter() - began
    print(json.dumps(report["planning"]), flush=True)

    inputs = step_inputs(args.model, dict(model.config), grid, True, device, dtype)
    stock = {fqn: attn.processor for fqn, attn in self_attention_modules(model).items()}
    planned = {name: planned_processors(model, plan) for name, plan in plans.items()}
    if args.compile:
        compile_blocks(model)
    warmup = warmup_calls(args.compile)

    rows = [time_step(model, inputs, STOCK, args.repeats, device, warmup=warmup)]
    if device.type == "cuda":
        rows.append(time_step(model, inputs, STOCK_CUDNN, args.repeats, device, cudnn=True, warmup=warmup))
    with attention_core_skipped(model):
        rows.append(time_step(model, inputs, SKIPPED, args.repeats, device, warmup=warmup))
    stock_ms, skipped_ms = rows[0].step_ms, rows[-1].step_ms
    report["rows"] = [vars(r) | {"speedup": stock_ms / r.step_ms} for r in rows]
    print(json.dumps(report["rows"]), flush=True)

    report["plans"] = {}
    for name, plan in plans.items():
        install_processors(model, planned[name])
        ratio, converted = _attention_flops_ratio(model, grid)
        row = time_step(model, inputs, name, args.repeats, device, warmup=warmup)
        install_processors(model, stock)
        entry = {"step_ms": row.step_ms, "speedup": stock_ms / row.step_ms, "peak_gib": row.peak_memory_gib,
                 "attention_flops_ratio": ratio, "converted_layers": converted, "variants": variant_counts(plan),
                 **yardsticks(stock_ms, skipped_ms, row.step_ms, matched.get(name, ratio))}
        if name in matched:
            entry["matched_budget"] = matched[name]
        latency = plan.meta.get("latency")
        if latency:
            entry |= {"predicted_speedup": latency["predicted_speedup"], "predicted_step_ms": latency["predicted_step_ms"],
                      "planner_stock_ms": latency["stock_step_ms"], "planner_skipped_ms": latency["skipped_attention_step_ms"]}
        report["plans"][name] = entry
        print(name, json.dumps(entry), flush=True)

    if args.video:
        name = "latency fastest" if args.video_plan == "fastest" else f"flops {float(args.video_plan):g}"
        video_rows = [type(rows[0])(STOCK, 0.0, 0.0), type(rows[0])(STUDENT, 0.0, 0.0)]
        _time_videos(args.model, model, model, plans[name], video_rows, grid, device, dtype, args.video_steps,
                     stock, planned[name])
        report["video"] = {"plan": name, "steps": args.video_steps, "guidance_scale": 5.0,
                           "stock_s": video_rows[0].video_s, "student_s": video_rows[1].video_s,
                           "speedup": video_rows[0].video_s / video_rows[1].video_s}
        print(json.dumps(report["video"]), flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


def markdown(report: dict) -> str:
    """The report as BENCHMARKS.md's tables."""
    grid = report["grid"]
    lines = [f"{report['model']}, {grid['frames']}×{grid['height']}×{grid['width']} ({report['tokens']:,} tokens), "
             f"{report['device']}, {'compiled' if report['compiled'] else 'eager'}, median of {report['repeats']}",
             "", "| step (both guidance branches) | ms | × stock | peak GiB |", "|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['name']} | {row['step_ms']:.1f} | {row['speedup']:.2f} | {row['peak_memory_gib'] or 0:.1f} |")
    lines += ["", "| plan | layers | attention FLOPs | ms | × stock | ideal(b) | of ideal | time saved of possible "
              "| predicted × |", "|---|---|---|---|---|---|---|---|---|"]
    for name, p in report["plans"].items():
        layers = ", ".join(f"{n} {v}" for v, n in sorted(p["variants"].items()))
        predicted = f"{p['predicted_speedup']:.2f}" if "predicted_speedup" in p else "—"
        saved = "—" if p["saving_share"] is None else f"{p['saving_share']:.0%}"
        lines.append(f"| {name} | {layers} | {p['attention_flops_ratio']:.1%} | {p['step_ms']:.1f} | {p['speedup']:.2f} "
                     f"| {p['ideal_speedup']:.2f} | {p['of_ideal']:.0%} | {saved} | {predicted} |")
    planning = report["planning"]
    lines += ["", f"planning ({planning['samples']} calibration inputs, budgets {planning['budgets']}): "
              f"{planning['seconds']:.0f} s, peak {planning['peak_gib'] or 0:.1f} GiB"
              + (f"; latency-planned: {planning['latency_seconds']:.0f} s" if "latency_seconds" in planning else "")]
    if "video" in report:
        v = report["video"]
        lines.append(f"video ({v['steps']} steps, guidance {v['guidance_scale']}): stock {v['stock_s']:.1f} s, "
                     f"{v['plan']} {v['student_s']:.1f} s = {v['speedup']:.2f}×")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
