#!/usr/bin/env bash
# The GPU runs behind BENCHMARKS.md, in groups of at most ten minutes each on one H100.
#
#   bash bench/gpu_checks.sh tests kernels      # groups run in the order given; logs and JSON under $OUT
#
# Groups: tests (every GPU-marked test), e2e480 / e2e720 (bench/e2e.py: whole-model steps of 1.3B at 480p and 720p, FLOP
# budgets 0.5, 0.3, 0.15 and the latency planner's fastest plan), quality (bench/quality.py: the quality-cost front on
# the toy teacher into runs/quality, docs/quality.md and docs/quality.png, copied to $OUT), quality-dense (the same
# front with the first 2 of 8 sampling steps dense, into $OUT; both fronts continue across runs, see `front` below),
# video (whole 480p generations, stock and the fastest plan), compiled (bench/e2e.py --compile at 480p: the e2e480 rows,
# blocks compiled), wan14b (the same rows for the 14B preset at 480p, budget 0.15, one calibration input, median of 2),
# kernels (bench/attention.py at 1.3B), hybrid (bench/hybrid.py --sweep), variants (bench/variants.py --sweep, 1.3B),
# train (bench/train_step.py, hybrid R=8, linear and hybrid_selected at 87.5% at 1.3B/480p/81 frames), toy
# (scripts/train_toy_teacher.py into $OUT/toy), wan22 (bench/e2e.py, what `vsurgery bench` times, on the Wan2.2 TI2V-5B
# preset at its native 121×704×1280: stock, the attention-free ceiling, FLOP budget 0.3 and the latency planner's
# fastest plan).
# Groups for 2 or more GPUs of one host: distill2 (distillation throughput of 1.3B/480p, hybrid R=8 on every layer,
# on 1 GPU and on 2 with DDP and with FSDP), cp720 (one denoising step of 1.3B at 720p, stock and the same plan, on 1
# GPU and with --cp 2), fsdp14b (one stage-1 and one stage-2 step of the 14B preset at 480p, FSDP over every GPU).
# Wheels in .whl/ (the peer kernels, or packages a machine without a package index lacks) are installed
# first into /tmp/site, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  # Groups launched side by side install into the same folder: one install at a time.
  flock /tmp/site.lock python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
# The CLI and the shipped recipes import (as surgery.cli, surgery.recipes) only from an installed package.
python3 -c "import surgery.recipes" 2>/dev/null ||
  flock /tmp/site.lock python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null

# The plans the multi-GPU groups distill and time: hybrid R=8 on every layer, at 480p.
plans() {
  python3 - "$OUT" <<'PY'
import sys
import surgery
from surgery.plan import Plan
for spec in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b"):
    plan = Plan.uniform(spec, surgery.load_config(spec), "hybrid", {"rate": 8})
    plan.grid = surgery.video_grid(81, 480, 832)
    plan.save(f"{sys.argv[1]}/plan-{spec}.json")
PY
}
DISTILL13="--model wan2.1-t2v-1.3b --plan $OUT/plan-wan2.1-t2v-1.3b.json --set stage1.steps=6 --set stage2.steps=6
  --set data.samples=8 --set train.checkpoint_every=1000 --set train.gradient_checkpointing=true --force"
BENCH13="--model wan2.1-t2v-1.3b --plan $OUT/plan-wan2.1-t2v-1.3b.json --height 720 --width 1280 --repeats 3 --json"

# A front (bench/quality.py into FOLDER) stops after $FRONT_SECONDS (default 540) so that it fits one sitting;
# its scores and plans, not the students' weights, go to $OUT/state/ in the checkout's layout: copied back into
# the checkout (`cp -r $OUT/state/runs .`), the next run of the group continues where this one stopped.
front() {
  local folder=$1 status
  shift
  timeout -k 10 "${FRONT_SECONDS:-540}" python3 bench/quality.py --device cuda --jobs 6 --out "$folder" "$@"
  status=$?
  pkill -f "bench/quality.py .*--score-student" || true  # the students a stopped sweep leaves running
  mkdir -p "$OUT/state"
  cp --parents "$folder"/students/*/scores.json "$folder"/plans/* "$folder"/quality.json "$OUT/state/" 2>/dev/null ||
    true  # a sweep stopped before its first student or plan has nothing to hand back
  return "$status"
}

failed=()
for group in "$@"; do
  echo "== $group ($(date -u +%H:%M:%S))"
  # A group that fails is reported at the end; the groups after it still run.
  if ! case $group in
    # Every GPU-marked test, in one process (the suite's own options run two).
    tests) python3 -m pytest -o addopts="" -m gpu -q -s -p no:warnings tests 2>&1 | tee "$OUT/gpu-tests.txt" ;;
    compile) python3 -m pytest -o addopts="" -m gpu -q -s -p no:warnings tests/test_compile.py 2>&1 | tee "$OUT/gpu-compile.txt" ;;
    e2e480) python3 bench/e2e.py --out "$OUT/e2e-480p.json" 2>&1 | tee "$OUT/e2e-480p.txt" ;;
    e2e720) python3 bench/e2e.py --height 720 --width 1280 --out "$OUT/e2e-720p.json" 2>&1 | tee "$OUT/e2e-720p.txt" ;;
    video) python3 bench/e2e.py --budgets 0.15 --repeats 1 --video --out "$OUT/e2e-video.json" 2>&1 | tee "$OUT/e2e-video.txt" ;;
    compiled) python3 bench/e2e.py --compile --out "$OUT/e2e-compiled.json" 2>&1 | tee "$OUT/e2e-compiled.txt" ;;
    quality) front runs/quality --doc docs/quality.md --plot docs/quality.png 2>&1 | tee "$OUT/quality.txt"
      status=$?; cp docs/quality.md docs/quality.png "$OUT/" 2>/dev/null; ((status == 0)) ;;
    quality-dense) front runs/quality-dense --set plan.dense_steps=2 --set plan.sampling_steps=8 \
      --plot "$OUT/quality-dense.png" 2>&1 | tee "$OUT/quality-dense.txt" ;;
    kernels) python3 bench/attention.py --shapes 1.3b --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.txt" ;;
    hybrid) python3 bench/hybrid.py --sweep --json "$OUT/hybrid.json" 2>&1 | tee "$OUT/hybrid.txt" ;;
    variants) python3 bench/variants.py --sweep --json "$OUT/variants.json" 2>&1 | tee "$OUT/variants.txt" ;;
    train)
      python3 bench/train_step.py --variant hybrid --params '{"rate": 8}' 2>&1 | tee "$OUT/train-hybrid.txt"
      python3 bench/train_step.py --variant linear --params '{}' 2>&1 | tee "$OUT/train-linear.txt"
      python3 bench/train_step.py --variant hybrid_selected --params '{"sparsity": 0.875}' 2>&1 \
        | tee "$OUT/train-hybrid-selected.txt" ;;
    toy) python3 scripts/train_toy_teacher.py --out "$OUT/toy" --report "$OUT/toy-report" 2>&1 | tee "$OUT/toy.txt" ;;
    wan14b) python3 bench/e2e.py --model wan2.1-t2v-14b --budgets 0.15 --samples 1 --repeats 2 \
              --out "$OUT/e2e-14b-480p.json" 2>&1 | tee "$OUT/e2e-14b-480p.txt" ;;
    wan22) python3 bench/e2e.py --model wan2.2-ti2v-5b --frames 121 --height 704 --width 1280 --budgets 0.3 \
             --out "$OUT/e2e-wan22-5b.json" 2>&1 | tee "$OUT/e2e-wan22-5b.txt" ;;
    distill2)
      plans
      accelerate launch --config_file configs/accelerate/1gpu.yaml -m surgery distill $DISTILL13 \
        --set data.batch_size=1 --out "$OUT/distill-1gpu"
      accelerate launch --config_file configs/accelerate/2gpu.yaml -m surgery distill $DISTILL13 \
        --set data.batch_size=2 --out "$OUT/distill-2gpu-ddp"
      accelerate launch --config_file configs/accelerate/2gpu.yaml -m surgery distill $DISTILL13 \
        --set data.batch_size=2 --set parallel.strategy=fsdp --out "$OUT/distill-2gpu-fsdp"
      python3 bench/distill_throughput.py "$OUT/distill-1gpu" "$OUT/distill-2gpu-ddp" "$OUT/distill-2gpu-fsdp" \
        --json "$OUT/distill2.json" 2>&1 | tee "$OUT/distill2.txt" ;;
    cp720)
      plans
      python3 -m surgery bench $BENCH13 > "$OUT/bench-720p-cp1.json"
      torchrun --standalone --nproc_per_node 2 -m surgery bench $BENCH13 --cp 2 > "$OUT/bench-720p-cp2.json"
      python3 -c "import json, sys; a, b = (json.load(open(f))['rows'] for f in sys.argv[1:])
for x, y in zip(a, b): print(f\"{x['name']}: {x['step_ms']:.0f} ms on 1 GPU, {y['step_ms']:.0f} ms with --cp 2: {x['step_ms'] / y['step_ms']:.2f}x\")" \
        "$OUT/bench-720p-cp1.json" "$OUT/bench-720p-cp2.json" 2>&1 | tee "$OUT/cp720.txt" ;;
    fsdp14b)
      plans
      gpus=$(nvidia-smi -L | wc -l)
      accelerate launch --multi_gpu --num_processes "$gpus" --mixed_precision bf16 -m surgery distill \
        --model wan2.1-t2v-14b --plan "$OUT/plan-wan2.1-t2v-14b.json" --set stage1.steps=1 --set stage2.steps=1 \
        --set parallel.strategy=fsdp --set train.gradient_checkpointing=true --set data.samples="$gpus" \
        --set data.batch_size="$gpus" --force --out "$OUT/distill-14b-fsdp" 2>&1 | tee "$OUT/fsdp14b.txt"
      python3 bench/distill_throughput.py "$OUT/distill-14b-fsdp" --json "$OUT/fsdp14b.json" 2>&1 | tee -a "$OUT/fsdp14b.txt" ;;
    *) echo "unknown group '$group' (tests, compile, e2e480, e2e720, quality, quality-dense, video, compiled, wan14b, kernels, hybrid, variants, train, toy, wan22, distill2, cp720, fsdp14b)" >&2
       exit 2 ;;
  esac; then failed+=("$group"); fi
done
if ((${#failed[@]})); then echo "failed: ${failed[*]}"; exit 1; fi
