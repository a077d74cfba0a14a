"""Distillation throughput of run folders, from their metrics.jsonl: samples/s and peak GPU memory per stage.

    python bench/distill_throughput.py runs/one-gpu runs/two-gpus [--json out.json]

Per stage: the median over steps of samples (the global batch) / seconds, leaving out the first step of each
stage (allocation, autotuning); with two or more runs, each one's samples/s over the first run's.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def stage_numbers(run: Path) -> dict[str, dict]:
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out = {}
    for stage in sorted({e["stage"] for e in entries}):
        steps = [e for e in entries if e["stage"] == stage]
        timed = steps[1:] or steps
        out[stage] = dict(
            steps=len(steps), samples_per_step=steps[-1]["samples"],
            samples_per_s=statistics.median(e["samples"] / e["seconds"] for e in timed),
            seconds_per_step=statistics.median(e["seconds"] for e in timed),
            peak_memory_gib=max((e["peak_memory_gib"] for e in steps if "peak_memory_gib" in e), default=None),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = {str(run): stage_numbers(run) for run in args.runs}
    first = report[str(args.runs[0])]
    for run, stages in report.items():
        for stage, numbers in stages.items():
            if stage in first:
                numbers["vs_first_run"] = numbers["samples_per_s"] / first[stage]["samples_per_s"]
            peak = numbers["peak_memory_gib"]
            print(f"{run} {stage}: {numbers['samples_per_s']:.3f} samples/s ({numbers['samples_per_step']} a step, "
                  f"{numbers['seconds_per_step']:.2f} s), peak {'—' if peak is None else f'{peak:.1f} GiB'} a GPU, "
                  f"{numbers.get('vs_first_run', 1.0):.2f}× the first run")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
