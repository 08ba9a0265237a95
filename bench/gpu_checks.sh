#!/usr/bin/env bash
# The GPU checks, on a machine with one CUDA GPU, from the repository root. The default
# set (CHECKS="xl datawait scaling tests") fits in about 8 minutes on an H200:
#   xl        DiT-XL/2 bf16 training steps compiled (torch.compile, default mode) at batch 128
#             and 256: steps/s, MFU against the bf16 matmul rate measured in the same
#             process (goal >= 0.60), peak memory                     (~3.5 min, most of it compiling)
#   datawait  the default stage-1 and stage-2 (text->image, token cache) runs' data wait with
#             4 loader workers, with 8, and with one epoch for the whole run (no worker
#             restarts), 300 steps each, plus the loader's samples/s per worker there and the
#             wait bench/data_throughput.py's formula predicts from them (goal <= 0.05)  (~2.5 min)
#   scaling   the largest rows of bench/scaling.py (32x32 codes and 10 s of audio for DiT-T/S/B,
#             stage 1 at 256 px), eager bf16 at batch 256                                (~0.5 min)
#   tests     the tests that need a GPU                                                   (~1 min)
# and, when named in CHECKS:
#   autotune  xl again with torch.compile(mode="max-autotune-no-cudagraphs") at batch 256 (minutes of tuning)
#   eager     DiT-B/2 and DiT-XL/2 eager (bench/train_throughput.py --device cuda --compile off)
#   train     a short bf16 training of each stage through the CLI (summary.json of each run)
# Each check runs under a time limit, and even when an earlier one failed, so one broken or
# slow piece does not hide the others' figures. Figures land in $OUT (default
# bench/results/gpu); each check's log in $OUT/<check>.log.
#
#   bash bench/gpu_checks.sh            # python3 must have the project's dependencies
#   CHECKS="xl datawait" bash bench/gpu_checks.sh
#   PYTHON=.venv/bin/python CHECKS="autotune" bash bench/gpu_checks.sh
set -u
OUT=${OUT:-bench/results/gpu}
PY=${PYTHON:-python3}
RUNS=${RUNS:-runs/gpu-checks}
CHECKS=${CHECKS:-xl datawait scaling tests}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=${WANDB_MODE:-offline}
# A smaller shapes-v1 render than the default 24000 samples: these runs measure speed.
# Shards of 500 samples: exact-mode streaming needs at least one shard per loader worker.
DATA=(data.root=data/shapes-v1-gpu-checks data.name=shapes-v1 data.shapes.train_samples=8000 data.shapes.val_samples=2000
      data.shapes.shard_size=500 data.num_workers=4)
COMMON=(trainer=gpu logger=csv "run.root=$RUNS" trainer.max_steps=600 trainer.val_every_steps=300)
status=0
started=$SECONDS
# step NAME LIMIT_S COMMAND...: run it with a time limit, its output also in $OUT/NAME.log.
step() {
    local name=$1 limit=$2; shift 2
    echo "=== [$((SECONDS - started)) s] $name: $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        echo "=== failed (exit $rc$([ "$rc" -eq 124 ] && echo ": over its ${limit} s limit")): $name"
        status=1
    fi
    return "$rc"
}
wanted() { [[ " $CHECKS " == *" $1 "* ]]; }
# Each bench writes bench/results/<name>.json (after each measurement: a run cut short keeps
# what it had); a copy goes to $OUT under the check's name. fresh: no older file of that name
# can pass for this check's.
fresh() { rm -f "bench/results/$1.json"; }
keep() { if [ -f "bench/results/$1.json" ]; then cp "bench/results/$1.json" "$OUT/$2.json"; fi; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

if wanted xl; then
    fresh train_throughput_gpu
    step xl 330 "$PY" bench/train_throughput.py --device cuda --compile on \
        --gpu-presets DiT-XL/2,DiT-XL/2 --gpu-batches 128,256
    keep train_throughput_gpu train_throughput_gpu_xl_compiled
fi
if wanted datawait; then
    fresh data_throughput_gpu
    step datawait 300 "$PY" bench/data_throughput.py --device cuda --steps 300 --batches 40
    keep data_throughput_gpu data_throughput_gpu
fi
if wanted scaling; then
    fresh scaling_gpu
    step scaling 120 "$PY" bench/scaling.py --device cuda --rows largest --batch 256
    keep scaling_gpu scaling_gpu
fi
if wanted tests; then
    step tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_stage1_quantizers.py
fi
if wanted autotune; then
    fresh train_throughput_gpu
    step autotune 600 "$PY" bench/train_throughput.py --device cuda --compile on \
        --gpu-presets DiT-XL/2 --gpu-batches 256 --gpu-compile-mode max-autotune-no-cudagraphs
    keep train_throughput_gpu train_throughput_gpu_xl_autotune
fi
if wanted eager; then
    fresh train_throughput_gpu
    step eager 300 "$PY" bench/train_throughput.py --device cuda --compile off
    keep train_throughput_gpu train_throughput_gpu_eager
fi
if wanted train; then
    step train_stage1 300 "$PY" -m lit_vqdiff.cli train stage1 "${COMMON[@]}" "${DATA[@]}"
    step train_stage2 300 "$PY" -m lit_vqdiff.cli train stage2 "${COMMON[@]}" "${DATA[@]}" "tokenizers.image=$RUNS/latest-stage1"
    for stage in stage1 stage2; do
        [ -f "$RUNS/latest-$stage/summary.json" ] && cp "$RUNS/latest-$stage/summary.json" "$OUT/summary_$stage.json"
    done
fi
echo "=== done in $((SECONDS - started)) s, status $status; figures in $OUT"
exit $status
