#!/usr/bin/env bash
# The CPU figures of docs/benchmarks.md in one run, for a machine that has not measured them yet (the 2-core AVX2
# laptop class above all): the CPU named, the bench of Lite0 and VGG16 pool5 on 400 photos (pipeline and trunk alone
# per engine), `features` with Lite0's defaults and with --precision int8 into fresh folders (whole command timed),
# the default head against the probes on the int8 rows, predict on one photo three times, and the int8 variants
# of scripts/int8_variants.py.
#   bash scripts/cpu_check.sh ../shared            # the folder holding data/flower_photos and weights/
# Everything goes to stdout (tee it to a log); the caches go to a temporary folder that is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
S=$(cd "${1:?usage: scripts/cpu_check.sh SHARED_FOLDER}" && pwd)
DATA=$S/data/flower_photos LITE0=$S/weights/tf_efficientnet_lite0_imagenet.pth VGG=$S/weights/vgg16_imagenet_features.pth
FF=${FF:-.venv/bin/flowerfeat} PY=${PY:-.venv/bin/python}
OUT=$(mktemp -d) && trap 'rm -rf "$OUT"' EXIT
export XDG_CACHE_HOME=$OUT/cache   # nothing kept from earlier runs: auto measures where it would for a new user

lscpu | grep -E "Model name|CPU family|Model:|^CPU\(s\)"
grep -o -w -E "avx2|fma|avx512f|avx512_vnni|avx_vnni|avx512_bf16|amx_int8" /proc/cpuinfo | sort -u | tr '\n' ' '; echo
step() { echo; echo "=== $*"; }
timed() { /usr/bin/time -f "whole command: %e s" "$@"; }

step "bench: Lite0, 400 photos"
$FF bench --data "$DATA" --model timm:tf_efficientnet_lite0 --weights "$LITE0" --precision int8 --limit 400
step "bench: VGG16 pool5, 400 photos"
$FF bench --data "$DATA" --model vgg16 --layer pool5 --weights "$VGG" --precision int8 --limit 400
for precision in auto int8; do
    step "features, Lite0, --precision $precision, fresh folder"
    timed $FF features --data "$DATA" --model timm:tf_efficientnet_lite0 --weights "$LITE0" \
        --precision $precision --out "$OUT/$precision" 2>&1 | grep -v "%)"
    $FF fit-head --features "$OUT/$precision" > /dev/null
    $FF report --head "$OUT/$precision" | grep "Overall"
done
step "default head against the probes, int8 rows (test split and 5-fold cross-validation)"
$PY scripts/head_vs_probe.py "$OUT"/int8/*/*/ --folds 5 | grep -v "^Epoch"
step "predict one photo, three times"
PHOTO=$(find "$DATA/test" -name "*.jpg" | sort | sed -n 1p)  # sed reads to the end: no SIGPIPE under pipefail
for _ in 1 2 3; do timed $FF predict "$PHOTO" --head "$OUT/auto" 2>&1 | tail -2; done
step "int8 variants of Lite0's trunk alone: speed against fp32 and cosine to it"
$PY scripts/int8_variants.py "$DATA" --weights "$LITE0" 2>&1 | grep -v -E "Quantized bias|Collecting tensor|Finding optimal|Number of|^Percentile"
