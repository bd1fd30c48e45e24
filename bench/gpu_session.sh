#!/usr/bin/env bash
# One whole GPU measurement per device call (issue #11; plan and floors in bench/gpu_notes.md).
#
#   here, once:      bash bench/gpu_session.sh carry      # fills .gpu/ (git-ignored) for the call's carry
#   on the device:   bash bench/gpu_session.sh STAGE...   # run tool: carry [".gpu"]; results under $OUT
#
# Stages (each fits one 10-minute call; the device has its own torch, so nothing is installed):
#   check    the device-independent tests on CUDA (golden parity in float64, the oracle properties,
#            the contract sweep, optimize with CUDA graphs), against the carried goldens
#   train    the demo on the GPU (bf16 FSDP2), --compile --grad-checkpoint with a kill and a resume,
#            then --model small --max-steps 50 on 1,000 generated 500x375 JPEGs (paper recipe)
#   speed    bench throughput, inference at batch 256: STViT-S against the authors' code (their AMP)
#            and timm's convnext_tiny and swin_tiny, one run
#   speed-train  the same for a training step at batch 128 (ours: bf16 FSDP2, compiled blocks)
#   data     bench data with the machine's cores, the device stage on the GPU, and the training feed
#   profile  bench profile on CUDA (compiled-bf16 and train), traces for TensorBoard
#   suite    the whole suite on the device's CPU under its torch
#
# Rehearsal, here, before a lease: STVIT_REHEARSAL=1 PY=VENV/bin/python bash bench/gpu_session.sh STAGE...
# runs every stage on this machine's CPU at toy sizes, in an environment like the device's (torch 2.11
# with Python 3.12, timm and torchvision: scripts/torch_matrix.sh 2.11.0 PYTHON3.12 builds one), so the
# GPU minutes meet no version or import problem. What only a GPU has (CUDA graphs, fp16 autocast, NCCL,
# FSDP2 on one GPU) is not exercised; the device-independent tests run on the CPU instead of CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."

carry() {  # here, not on the device: what the calls need from outside the repository
    local golden=${STVIT_SHARED_GOLDEN:-../shared/golden}
    local authors=${STVIT_AUTHORS_CODE:-/tmp/stvit-authors/models/stvit.py}
    rm -rf .gpu && mkdir -p .gpu/golden .gpu/authors/models
    # 64 MiB travel per call: every golden but tiny_a.pt (30 MB; tiny_b.pt covers the same code).
    find "$golden" -maxdepth 1 \( -name '*.json' -o -name '*.pt' \) ! -name 'tiny_a.pt' -exec cp {} .gpu/golden/ \;
    if [ -f "$authors" ]; then cp "$authors" .gpu/authors/models/stvit.py
    else echo "no authors' models/stvit.py at $authors (set STVIT_AUTHORS_CODE): the speed stage needs it" >&2; fi
    du -sh .gpu
}
if [ "${1:-}" = carry ]; then carry; exit; fi
# At most 8 files come back from a call: JSON results go to $OUT, every log into one archive there.
OUT=${OUT:-$PWD/gpu-out}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
trap 'tar czf "$OUT/logs_$(date -u +%H%M%S).tgz" -C "$LOGS" . 2>/dev/null' EXIT
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 STVIT_GOLDEN=$PWD/.gpu/golden
AUTHORS=$PWD/.gpu/authors/models/stvit.py
PY=${PY:-python3}
status=0
# The sizes of each stage: on the device, and in a rehearsal (the suite: part of it, on xdist too).
if [ -n "${STVIT_REHEARSAL:-}" ]; then
    DEV=cpu BATCH=2 TRAIN_BATCH=2 RUNS=1 WORKERS=1 STEPS=2 IMAGES=16 LIMIT="--max-steps 6" KILL=3
    DATA_IMAGES=20 DATA_WORKERS="0 1" SUITE="-n 2 tests/test_model.py"
else
    DEV=cuda BATCH=256 TRAIN_BATCH=128 RUNS=10 WORKERS=14 STEPS=50 IMAGES=1000 LIMIT="" KILL=400
    DATA_IMAGES=512 DATA_WORKERS="1 8 15" SUITE="-n 8"
fi

step() {  # step NAME COMMAND...: run, log to $LOGS/NAME.log, remember a failure, go on
    local name=$1; shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    # train_kill kills itself on purpose (SIGKILL: 137); anything else that fails is a failure
    if [ "$rc" -ne 0 ] && ! { [ "$name" = train_kill ] && [ "$rc" -eq 137 ]; }; then status=1; fi
}

environment() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
    $PY -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "python", sys.version.split()[0], "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
}

for stage in "$@"; do
    case $stage in
    check)
        environment
        step check_$DEV $PY -m pytest -q -p no:cacheprovider --device $DEV -m on_device
        ;;
    train)
        environment
        runs=/tmp/runs
        rm -rf $runs
        step train_demo $PY -m train --output-dir $runs/demo $LIMIT
        step train_kill $PY -m train --output-dir $runs/compiled --compile --grad-checkpoint --fault kill@$KILL $LIMIT
        step train_resume $PY -m train --output-dir $runs/compiled --compile --grad-checkpoint $LIMIT
        # train needs train/ and val/: bench's generated JPEGs are train/ only, val/ shows the same images
        step make_jpegs $PY -c "from pathlib import Path; from bench.data import imagenet_like; \
d = imagenet_like(Path('/tmp/jpegs'), $IMAGES, (500, 375)); (d / 'val').is_dir() or (d / 'val').symlink_to('train'); print(d)"
        jpegs=$(tail -n 1 "$LOGS/make_jpegs.log")
        step train_small $PY -m train --model small --data-path "$jpegs" --max-steps $STEPS --batch-size $TRAIN_BATCH \
            --num-workers $WORKERS --compile --output-dir $runs/small --log-every 10
        tar czf "$LOGS/train_runs.tgz" -C $runs --exclude='*.pt' --exclude='checkpoint*' . 2>/dev/null
        ;;
    speed)
        environment
        step speed_inference $PY -m bench throughput --models small timm:convnext_tiny timm:swin_tiny_patch4_window7_224 \
            --batch-sizes $BATCH --modes eager eager-amp compiled-bf16 authors authors-amp \
            --authors-code "$AUTHORS" --runs $RUNS --json "$OUT/throughput_gpu_inference.json"
        ;;
    speed-train)
        environment
        step speed_train $PY -m bench throughput --models small timm:convnext_tiny timm:swin_tiny_patch4_window7_224 \
            --batch-sizes $TRAIN_BATCH --modes train train-bf16 authors-train authors-train-amp \
            --authors-code "$AUTHORS" --runs $RUNS --json "$OUT/throughput_gpu_train.json"
        ;;
    data)
        environment
        step data $PY -m bench data --device $DEV --images $DATA_IMAGES --workers $DATA_WORKERS --batch-size $TRAIN_BATCH \
            --pipelines paper paper-defer --baseline --train small --json "$OUT/data_gpu.json"
        ;;
    profile)
        environment
        for mode in compiled-bf16 train; do
            step "profile_$mode" $PY -m bench profile --device $DEV --model small --mode $mode --batch $TRAIN_BATCH \
                --out /tmp/profile_$mode --json "$OUT/profile_gpu_$mode.json"
            tar czf "$LOGS/profile_$mode.tgz" -C /tmp/profile_$mode . 2>/dev/null  # trace + TensorBoard files
        done
        ;;
    suite)
        environment
        step suite_cpu $PY -m pytest -q -p no:cacheprovider $SUITE
        ;;
    *) echo "unknown stage $stage; stages: check train speed speed-train data profile suite (carry: alone, here)" >&2; exit 2 ;;
    esac
done
exit $status
