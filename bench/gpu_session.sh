#!/usr/bin/env bash
# One session on a GPU host reached with the repository and the pack: train the paper's recipe in one shot with the
# authors' schedule (the committed autoencoder training/weights/autoencoder-w64.pt continued for up to 100 epochs
# with early stopping after 20 without improvement, then phase 1, then phase 2 at Adam 1e-5), then measure the
# classifier's inference and the training steps' throughput. Every step runs even if an earlier one failed;
# everything worth bringing back lands flat in OUTDIR (8 files: model.pt, metrics.json, report.md, the three
# plots, the continued autoencoder-w64.pt when it improved, and session.log, which holds the training log).
# Needs only torch, torchvision and numpy (no DICOM library). The working tree and the pack travel together under
# a size limit: build the pack to fit what the tree leaves (docs/TRAINING.md).
#
#   bench/gpu_session.sh PACK OUTDIR            the real session (about 8 minutes on one H200)
#   bench/gpu_session.sh PACK OUTDIR --tiny     the same steps at toy sizes on the CPU, to test the script
set -uo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 2 ]; then
    echo "usage: $0 PACK OUTDIR [--tiny]" >&2
    exit 2
fi
pack=$1 out=$2 tiny=${3:-}
mkdir -p "$out"
exec > >(tee -a "$out/session.log") 2>&1

if [ "$tiny" = "--tiny" ]; then
    train=(--width 4 --dense-units 8 --device cpu --budget-seconds 60 --pretrain-epochs 1 --phase1-epochs 1
           --phase2-epochs 1 --pretrain-batch-size 8 --phase1-batch-size 8 --phase2-batch-size 8 --no-progress
           --export-autoencoder "$out/autoencoder-w64.pt")
    infer=(--device cpu --batch 4 --seconds 1 --warmup 1 --configs fp32,fp32-cl)
    steps=(--device cpu --width 4 --dense-units 8 --cae-batch 4 --cls-batch 4 --steps 2 --warmup 1 --no-amp)
else
    train=(--budget-seconds 420 --no-progress --pretrain-share 0.5
           --init-autoencoder training/weights/autoencoder-w64.pt --export-autoencoder "$out/autoencoder-w64.pt"
           --pretrain-epochs 100 --pretrain-patience 20 --phase2-lr 1e-5 --phase2-epochs 20)
    infer=(--device cuda --batch 256 --seconds 10 --configs fp32,fp32-cl,bf16-cl,bf16-cl-compile)
    steps=(--device cuda --cae-batch 256 --cls-batch 64 256 --steps 50)
fi

failed=0
step() {
    local name=$1
    shift
    echo "=== $name: $* ($(date -u +%H:%M:%S))"
    local started=$SECONDS
    if "$@"; then
        echo "=== $name: done in $((SECONDS - started)) s"
    else
        echo "=== $name: FAILED (exit $?) after $((SECONDS - started)) s"
        failed=1
    fi
}

step host sh -c 'nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; nproc; python -c "import torch; print(torch.__version__, torch.cuda.is_available())"'
work="${TMPDIR:-/tmp}/cxr-gpu-work"
step train python -m training oneshot --pack "$pack" --out "$out" --work "$work" "${train[@]}"
[ -f "$out/train.log" ] && mv "$out/train.log" "$work/"  # its lines are in session.log already: 8 files at most
if [ -f "$out/model.pt" ]; then
    step inference python bench/inference.py --model "$out/model.pt" "${infer[@]}"
else
    step inference python bench/inference.py --width "$([ "$tiny" = "--tiny" ] && echo 4 || echo 64)" "${infer[@]}"
fi
step train-throughput python bench/train_throughput.py "${steps[@]}"
ls -la "$out"
exit $failed
