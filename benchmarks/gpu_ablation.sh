#!/bin/bash
# The paired TL-Align vs grid-CutMix comparison of docs/results.md on a GPU: the full Fashion-MNIST
# (60,000 training images, 10,000 val), the two small Swins (tla_swin_micro, and tla_swin_micro_h1 with
# one head per block, where the labels move most; a ViT's barely move), 3 seeds per arm, 10 epochs, four
# runs at a time on one GPU, through `tla` itself
# (one `tla submit sweep`, local executor), then `tla report --by-arm` and the label shift of every
# TL-Align run. Written for one H100 in under 9 minutes; NOT YET RUN: no GPU was lent to the session
# that wrote it, so that time is an estimate (12 runs x 10 epochs x 60,000 images at ~20,000 images/s
# over the four runs, the loaders' CPU work being the limit) and --epochs/--seeds are the knobs.
#
# Prepare on a machine with network (../shared/gpu/README.md says how): .gpu/whl (timm, submitit,
# pydantic wheels) and .gpu/fmnist (the Fashion-MNIST IDX files), in a folder git ignores, carried
# with the checkout. Then, on the GPU machine, from the checkout's root:
#
#     OUT=/some/folder bash benchmarks/gpu_ablation.sh [extra ablation.py options]
#
# Results: $OUT/docs/gpu-paired.json, results-gpu-paired.md, gpu-paired.png; the runs in $OUT/runs.
set -euo pipefail
OUT=${OUT:-/tmp/gpu-ablation}
mkdir -p "$OUT/docs"
if [[ -d .gpu/whl ]]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
[[ -d .gpu/fmnist ]] && export TLA_FMNIST_DIR=$PWD/.gpu/fmnist
export TLA_RUNS=$OUT/runs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$SECONDS
python3 benchmarks/ablation.py --name gpu-paired --dataset fashion-mnist --per-class 6000 \
    --model tla_swin_micro,tla_swin_micro_h1 --img-size 32 --epochs 10 --seeds 0,1,2 \
    --arms grid-cutmix,tl-align --batch-size 256 --lr 2e-3 --parallel 4 --workers 3 \
    --recipe "--crop-scale 0.35 --warmup-epochs 1" --out "$OUT/docs" "$@"
echo "gpu_ablation: $((SECONDS - start)) s"
