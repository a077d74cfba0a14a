#!/usr/bin/env bash
# The GPU runs behind BENCHMARKS.md, in groups of at most ten minutes each on one H100.
#
#   bash bench/gpu_checks.sh tests kernels      # groups run in the order given; logs and JSON under $OUT
#
# Groups: tests (every GPU-marked test), e2e480 / e2e720 (bench/e2e.py: whole-model steps of 1.3B at 480p and
# 720p, FLOP budgets 0.5, 0.3, 0.15 and the latency planner's fastest plan), video (whole 480p generations, stock and
# the fastest plan), compiled (bench/e2e.py --compile at 480p), kernels (bench/attention.py at 1.3B), hybrid
# (bench/hybrid.py --sweep), variants (bench/variants.py --sweep, 1.3B), train (bench/train_step.py, hybrid
# R=8 and linear at 1.3B/480p/81 frames), toy (scripts/train_toy_teacher.py into $OUT/toy), wan22 (bench/e2e.py, what
# `vsurgery bench` times, on the Wan2.2 TI2V-5B preset at its native 121×704×1280: stock, the attention-free
# ceiling, FLOP budget 0.3 and the latency planner's fastest plan).
# Wheels in .whl/ (the peer kernels, or packages a machine without a package index lacks) are installed
# first into /tmp/site, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD

failed=()
for group in "$@"; do
  echo "== $group ($(date -u +%H:%M:%S))"
  # A group that fails is reported at the end; the groups after it still run.
  if ! case $group in
    # The GPU-marked tests; the others need the CLI, which imports as surgery.cli only once installed.
    tests) python3 -m pytest -m gpu -q -s -p no:warnings tests/kernels tests/test_compile.py 2>&1 | tee "$OUT/gpu-tests.txt" ;;
    compile) python3 -m pytest -m gpu -q -s -p no:warnings tests/test_compile.py 2>&1 | tee "$OUT/gpu-compile.txt" ;;
    e2e480) python3 bench/e2e.py --out "$OUT/e2e-480p.json" 2>&1 | tee "$OUT/e2e-480p.txt" ;;
    e2e720) python3 bench/e2e.py --height 720 --width 1280 --out "$OUT/e2e-720p.json" 2>&1 | tee "$OUT/e2e-720p.txt" ;;
    video) python3 bench/e2e.py --budgets 0.15 --repeats 1 --video --out "$OUT/e2e-video.json" 2>&1 | tee "$OUT/e2e-video.txt" ;;
    compiled) python3 bench/e2e.py --budgets 0.15 --compile --out "$OUT/e2e-compiled.json" 2>&1 | tee "$OUT/e2e-compiled.txt" ;;
    kernels) python3 bench/attention.py --shapes 1.3b --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.txt" ;;
    hybrid) python3 bench/hybrid.py --sweep --json "$OUT/hybrid.json" 2>&1 | tee "$OUT/hybrid.txt" ;;
    variants) python3 bench/variants.py --sweep --json "$OUT/variants.json" 2>&1 | tee "$OUT/variants.txt" ;;
    train)
      python3 bench/train_step.py --variant hybrid --params '{"rate": 8}' 2>&1 | tee "$OUT/train-hybrid.txt"
      python3 bench/train_step.py --variant linear --params '{}' 2>&1 | tee "$OUT/train-linear.txt" ;;
    toy) python3 scripts/train_toy_teacher.py --out "$OUT/toy" --report "$OUT/toy-report" 2>&1 | tee "$OUT/toy.txt" ;;
    wan22) python3 bench/e2e.py --model wan2.2-ti2v-5b --frames 121 --height 704 --width 1280 --budgets 0.3 \
             --out "$OUT/e2e-wan22-5b.json" 2>&1 | tee "$OUT/e2e-wan22-5b.txt" ;;
    *) echo "unknown group '$group' (tests, compile, e2e480, e2e720, video, compiled, kernels, hybrid, variants, train, toy, wan22)" >&2
       exit 2 ;;
  esac; then failed+=("$group"); fi
done
if ((${#failed[@]})); then echo "failed: ${failed[*]}"; exit 1; fi
