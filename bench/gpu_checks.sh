#!/usr/bin/env bash
# The GPU checks, on a machine with one CUDA GPU, from the repository root:
#   1. DiT-B/2 and DiT-XL/2 bf16 training steps (eager), steps/s, MFU and peak memory;
#   2. a short bf16 training of each stage through the CLI (steps/s and peak memory land
#      in each run's summary.json);
#   3. the tests that need a GPU;
#   4. step 1 again with torch.compile.
# Figures are copied to $OUT (default bench/results/gpu). Each step runs even when an
# earlier one failed, so one broken piece does not hide the others' figures; CHECKS picks
# some of them.
#
#   bash bench/gpu_checks.sh            # python3 must have the project's dependencies
#   CHECKS="train tests" bash bench/gpu_checks.sh
set -u
OUT=${OUT:-bench/results/gpu}
PY=${PYTHON:-python3}
RUNS=${RUNS:-runs/gpu-checks}
CHECKS=${CHECKS:-throughput train tests compiled}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# A smaller shapes-v1 render than the default 24000 samples: these runs measure speed.
# Shards of 500 samples: exact-mode streaming needs at least one shard per loader worker.
DATA=(data.root=data/shapes-v1-gpu-checks data.shapes.train_samples=8000 data.shapes.val_samples=2000
      data.shapes.shard_size=500 data.num_workers=4)
COMMON=(trainer=gpu logger=csv "run.root=$RUNS" trainer.max_steps=600 trainer.val_every_steps=300)
status=0
step() { echo "=== $*"; "$@" || { echo "=== failed ($?): $*"; status=1; return 1; }; }
wanted() { [[ " $CHECKS " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if wanted throughput; then
    step "$PY" bench/train_throughput.py --device cuda --compile off &&
        cp bench/results/train_throughput_gpu.json "$OUT/train_throughput_gpu_eager.json"
fi
if wanted train; then
    step "$PY" -m lit_vqdiff.cli train stage1 "${COMMON[@]}" "${DATA[@]}"
    step "$PY" -m lit_vqdiff.cli train stage2 "${COMMON[@]}" "${DATA[@]}" "tokenizers.image=$RUNS/latest-stage1"
    for stage in stage1 stage2; do
        [ -f "$RUNS/latest-$stage/summary.json" ] && cp "$RUNS/latest-$stage/summary.json" "$OUT/summary_$stage.json"
    done
fi
if wanted tests; then
    step "$PY" -m pytest -q -p no:cacheprovider tests/test_stage1_quantizers.py
fi
if wanted compiled; then
    step "$PY" bench/train_throughput.py --device cuda --compile on &&
        cp bench/results/train_throughput_gpu.json "$OUT/train_throughput_gpu_compiled.json"
fi
exit $status
