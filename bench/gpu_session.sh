#!/usr/bin/env bash
# The GPU session of issue #20: 15 device-minutes in all (the machine's start and idle waits count),
# two calls of at most 10 minutes. Plan, predictions and log: bench/gpu_notes.md.
#
#   here, once:      bash bench/gpu_session.sh carry       # fills .gpu/ (git-ignored) for the calls' carry
#   on the device:   bash bench/gpu_session.sh STAGE...    # run tool: carry [".gpu"]; results under $OUT
#
# Every step runs under `timeout` with what is left of STVIT_DEADLINE_S (default 540 s from the call's
# start; the run tool's timeout_s a little more), and under its own cap where it has one, so the
# script itself ends first: the logs are archived and every finished step's JSON comes back even when a
# step runs long. Nothing is installed: the device has torch 2.11, timm and torchvision.
#
# The two calls, in the issue's order:
#   speed    inference at batch 256, one bench run: STViT-S compiled bf16 + CUDA graphs, the authors'
#            code under their AMP (fp16 autocast), timm's convnext_tiny and swin_tiny compiled bf16;
#            then a training step at batch 128: ours bf16 FSDP2 (one process, NCCL), blocks compiled,
#            against the authors' AMP step
#   correct  the device-independent tests on CUDA (golden parity in float64, the oracle properties, the
#            contract sweep, optimize with CUDA graphs, a new shape recompiling; capped at 240 s); the
#            demo on the GPU, killed mid-epoch and resumed (its final accuracy against the CPU's);
#            bench data's paper-defer pipeline with its device stage on the GPU
# Later, if a lease has time left:
#   profile      bench profile on CUDA (compiled-bf16 and train), traces for TensorBoard
#   train-small  --model small --compile, 50 steps on 1,000 generated 500x375 JPEGs (the paper recipe)
#   suite        the whole suite on the device's CPU under its torch
#
# Rehearsal, here, before a lease: STVIT_REHEARSAL=1 PY=VENV/bin/python bash bench/gpu_session.sh STAGE...
# runs the stages on this machine's CPU at toy sizes, in an environment like the device's (torch 2.11
# with Python 3.12, timm and torchvision: scripts/torch_matrix.sh 2.11.0 PYTHON3.12 builds one), so the
# GPU minutes meet no version or import problem. What only a GPU has (CUDA graphs, fp16 autocast, NCCL,
# FSDP2 on one GPU) is not exercised; the device-independent tests run on the CPU instead of CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."

carry() {  # here, not on the device: what the calls need from outside the repository
    local golden=${STVIT_SHARED_GOLDEN:-../shared/golden}
    local authors=${STVIT_AUTHORS_CODE:-/tmp/stvit-authors/models/stvit.py}
    rm -rf .gpu && mkdir -p .gpu/golden .gpu/authors/models
    # 64 MiB travel per call, the working tree included: every golden but tiny_a.pt (30 MB; tiny_b.pt
    # covers the same code) and sot_b.pt (7 MB; sot_a.pt covers SoT, sovit_a/b the code it shares).
    find "$golden" -maxdepth 1 \( -name '*.json' -o -name '*.pt' \) ! -name 'tiny_a.pt' ! -name 'sot_b.pt' \
        -exec cp {} .gpu/golden/ \;
    if [ -f "$authors" ]; then cp "$authors" .gpu/authors/models/stvit.py
    else echo "no authors' models/stvit.py at $authors (set STVIT_AUTHORS_CODE): the speed stage needs it" >&2; fi
    # What travels: the files git tracks or would track, and .gpu (a new golden may not fit: say so here)
    local tree carried
    tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 cat 2>/dev/null | wc -c)
    carried=$(find .gpu -type f -print0 | xargs -0 cat | wc -c)
    echo "travels: $(( (tree + carried) / 1048576 )) MiB (working tree $(( tree / 1048576 )), .gpu $(( carried / 1048576 ))) of 64"
    if [ $(( tree + carried )) -gt $(( 64 * 1048576 )) ]; then
        echo "over the device's 64 MiB: leave more goldens out of .gpu (carry() in $0)" >&2
        return 1
    fi
}
if [ "${1:-}" = carry ]; then carry; exit; fi
# At most 8 files come back from a call: JSON results go to $OUT, every log into one archive there.
DEADLINE=$((SECONDS + ${STVIT_DEADLINE_S:-540}))
OUT=${OUT:-$PWD/gpu-out}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
trap 'tar czf "$OUT/logs_$(date -u +%H%M%S).tgz" -C "$LOGS" . 2>/dev/null' EXIT
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 STVIT_GOLDEN=$PWD/.gpu/golden
AUTHORS=$PWD/.gpu/authors/models/stvit.py
PY=${PY:-python3}
status=0
# The sizes of each stage: on the device, and in a rehearsal (the tests: a part of them).
if [ -n "${STVIT_REHEARSAL:-}" ]; then
    DEV=cpu BATCH=2 TRAIN_BATCH=2 RUNS=1 WORKERS=1 STEPS=2 IMAGES=16 LIMIT="--max-steps 6" KILL=3 CKPT=2
    DATA_IMAGES=20 DATA_WORKERS=1 CHECK="tests/test_golden.py tests/test_seghead.py tests/test_devices.py"
    SUITE="-n 2 tests/test_model.py"
else
    DEV=cuda BATCH=256 TRAIN_BATCH=128 RUNS=5 WORKERS=14 STEPS=50 IMAGES=1000 LIMIT="" KILL=420 CKPT=50
    DATA_IMAGES=512 DATA_WORKERS=15 CHECK="" SUITE="-n 8"
fi

step() {  # step NAME CAP_S COMMAND...: run within CAP_S (0: no cap of its own) and the deadline, log to
          # $LOGS/NAME.log, remember a failure, go on
    local name=$1 cap=$2; shift 2
    local left=$((DEADLINE - SECONDS - 15))
    if [ "$cap" -gt 0 ] && [ "$cap" -lt "$left" ]; then left=$cap; fi
    if [ "$left" -lt 20 ]; then
        echo "=== $name: not run, the deadline is near ($((DEADLINE - SECONDS)) s left)"; status=1; return
    fi
    echo "=== $name (at most $left s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$left" "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s$([ "$rc" -eq 124 ] && echo ', stopped at its time limit')"
    # train_kill kills itself on purpose (SIGKILL: 137); anything else that fails is a failure
    if [ "$rc" -ne 0 ] && ! { [ "$name" = train_kill ] && [ "$rc" -eq 137 ]; }; then status=1; fi
}

environment() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || true
    $PY -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "python", sys.version.split()[0], "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
}

environment
for stage in "$@"; do
    case $stage in
    speed)
        step speed_inference 0 $PY -m bench throughput --models small timm:convnext_tiny \
            timm:swin_tiny_patch4_window7_224 --batch-sizes $BATCH --modes compiled-bf16 authors-amp \
            --authors-code "$AUTHORS" --runs $RUNS --json "$OUT/throughput_gpu_inference.json"
        step speed_train 0 $PY -m bench throughput --models small --batch-sizes $TRAIN_BATCH \
            --modes train-bf16 authors-train-amp --authors-code "$AUTHORS" --runs $RUNS \
            --json "$OUT/throughput_gpu_train.json"
        ;;
    correct)
        # shellcheck disable=SC2086  # CHECK: test paths, or none for every test
        step check_$DEV 240 $PY -m pytest -q -p no:cacheprovider --device $DEV -m on_device $CHECK
        runs=/tmp/runs
        rm -rf $runs
        # the demo (781 steps, 31 an epoch), killed at step 420 and resumed from its step-400 checkpoint,
        # mid-epoch; its final accuracy against the CPU's
        step train_kill 0 $PY -m train --output-dir $runs/demo --ckpt-every $CKPT --fault kill@$KILL $LIMIT
        step train_resume 0 $PY -m train --output-dir $runs/demo --ckpt-every $CKPT $LIMIT
        grep -q "resumed from" "$LOGS/train_resume.log" || { echo "=== train_resume: did not resume"; status=1; }
        tar czf "$LOGS/train_runs.tgz" -C $runs --exclude='*.pt' --exclude='checkpoint*' --exclude='ckpt-*' . 2>/dev/null
        step data 0 $PY -m bench data --device $DEV --images $DATA_IMAGES --workers $DATA_WORKERS \
            --batch-size $TRAIN_BATCH --pipelines paper-defer --baseline --json "$OUT/data_gpu.json"
        ;;
    profile)
        for mode in compiled-bf16 train; do
            step "profile_$mode" 0 $PY -m bench profile --device $DEV --model small --mode $mode --batch $TRAIN_BATCH \
                --out /tmp/profile_$mode --json "$OUT/profile_gpu_$mode.json"
            tar czf "$LOGS/profile_$mode.tgz" -C /tmp/profile_$mode . 2>/dev/null  # trace + TensorBoard files
        done
        ;;
    train-small)
        # train needs train/ and val/: bench's generated JPEGs are train/ only, val/ shows the same images
        step make_jpegs 0 $PY -c "from pathlib import Path; from bench.data import imagenet_like; \
d = imagenet_like(Path('/tmp/jpegs'), $IMAGES, (500, 375)); (d / 'val').is_dir() or (d / 'val').symlink_to('train'); print(d)"
        jpegs=$(tail -n 1 "$LOGS/make_jpegs.log")
        step train_small 0 $PY -m train --model small --data-path "$jpegs" --max-steps $STEPS --batch-size $TRAIN_BATCH \
            --num-workers $WORKERS --compile --output-dir /tmp/runs/small --log-every 10
        ;;
    suite)
        # shellcheck disable=SC2086
        step suite_cpu 0 $PY -m pytest -q -p no:cacheprovider $SUITE
        ;;
    *) echo "unknown stage $stage; stages: speed correct profile train-small suite (carry: alone, here)" >&2; exit 2 ;;
    esac
done
exit $status
