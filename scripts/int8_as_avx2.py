"""int8 features made with the quantization settings a CPU without VNNI resolves (7-bit weights, reduce_range), on
whatever CPU runs this: the rows an AVX2 laptop's `features --precision int8` gives, for measuring their accuracy
on a machine that has VNNI. With 7-bit weights the AVX2 kernels' 16-bit pair sums cannot saturate (2 x 255 x 64 <
32,767), so both kinds compute the same integer products; only fp32 rounding in the requantization may differ.

    python scripts/int8_as_avx2.py ../shared/data/flower_photos OUT --model timm:tf_efficientnet_lite0 \
        --weights ../shared/weights/tf_efficientnet_lite0_imagenet.pth
    python scripts/head_vs_probe.py OUT/flower_photos-*/timm-tf_efficientnet_lite0-*/ --folds 5

Speed is not measured here: it is this CPU's, not an AVX2 one's.
"""

from __future__ import annotations

import argparse
import time

import flowerfeat
from flowerfeat import quantize

AVX2 = frozenset({"avx2", "fma"})  # the flags of the 2-core AMD EPYC family 23 that matter to quantize.py


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--model", default="timm:tf_efficientnet_lite0")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--layer", default=None)
    a = ap.parse_args()
    quantize.cpu_flags = lambda: AVX2  # the one change: settings_for_this_cpu sees an AVX2 CPU
    assert quantize.settings_for_this_cpu(256, 0).reduce_range
    t = time.perf_counter()
    files = flowerfeat.extract(a.data, a.out, a.layer, a.weights, model=a.model, precision="int8", progress=True)
    print(f"{files} in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
