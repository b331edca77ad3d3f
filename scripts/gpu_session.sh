#!/usr/bin/env bash
# Issue 34's one prepared run on a lent GPU machine, under ten minutes: made here with
#   python scripts/gpu_payload.py ../shared gpu_payload && echo /gpu_payload/ >> .git/info/exclude
# then run there (the device tool: carry ["gpu_payload"], timeout_s 600):
#   bash scripts/gpu_session.sh gpu_payload "$OUT"
# The rows most wanted first, each model's figures in OUT/<model>/gpu_check.json as each step finishes (and its log
# beside), so a run cut short still answers: VGG16 fc7 over 30,400 generated JPEGs (warm --decode gpu and hybrid, the
# trunk alone and the parts, agreement with the CPU fp32 path on synthetic and on the shared test photos at pool5,
# the top trained on cached activations at pool4, the conv5 block, as docs/heads.md's CPU figures; compiled), then
# EfficientNet-Lite0 (warm, parts, compiled), then ResNet-50 (warm, parts). Each model has a hard time limit; its
# optional steps are skipped past its --budget.
set -uo pipefail
P=${1:?usage: scripts/gpu_session.sh PAYLOAD OUT}
OUT=${2:?usage: scripts/gpu_session.sh PAYLOAD OUT}
cd "$(dirname "$0")/.."
model() {  # name, hard limit in seconds, then gpu_check.py's options
    local name=$1 limit=$2
    shift 2
    mkdir -p "$OUT/$name"
    echo "=== $name (at most ${limit} s)"
    # shellcheck disable=SC2086  # GPU_CHECK_ARGS: extra options, e.g. "--smoke --n 20 --copies 1" to try it on a CPU
    timeout "$limit" bash scripts/gpu_check.sh --out "$OUT/$name" "$@" ${GPU_CHECK_ARGS:-} > "$OUT/$name/log.txt" 2>&1
    echo "exit $? after $SECONDS s in all"
    grep -E "^(WARM|model only|loader|GPU prep|agreement|real photos|fit-head|compiled|FAILED|SKIPPED|\[)" "$OUT/$name/log.txt"
}
model vgg16 270 --model vgg16 --steps warm,parts,agreement,real,top,compile --budget 150 \
    --photos "$P/photos" --weights "$P/weights/vgg16_imagenet_features.pth" --real-ref 20 --top-cut pool4
model lite0 150 --model timm:tf_efficientnet_lite0 --steps warm,parts,compile --budget 60
model resnet50 100 --model resnet50 --steps warm,parts --budget 60
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
