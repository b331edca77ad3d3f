"""The trunk alone at several batch sizes (docs/benchmarks.md, "Batch size"): images/s of one engine on random
images held in memory, each size after a warm-up batch, rounds alternated. Random input: the speed does not depend
on the values.

    python scripts/batch_sizes.py --model timm:tf_efficientnet_lite0 --engine onnxruntime
    python scripts/batch_sizes.py --model vgg16 --layer pool5 --weights vgg16_imagenet_features.pth --images 64
"""

from __future__ import annotations

import argparse
import time

import torch

from flowerfeat.config import ExtractConfig
from flowerfeat.recipe import build, resolve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="timm:tf_efficientnet_lite0")
    ap.add_argument("--layer", default=None)
    ap.add_argument("--weights", default="none")
    ap.add_argument("--engine", default="onnxruntime", choices=("torch", "onnxruntime"))
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--sizes", default="4,8,16,32,64")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    cfg = ExtractConfig(model=a.model, layer=a.layer, weights=a.weights, engine=a.engine, precision=a.precision)
    trunk = build(resolve(cfg, torch.device("cpu")))
    x = torch.randn(a.images, *trunk.recipe.preprocessing.input_shape)
    for rnd in range(a.rounds):
        line = []
        for b in map(int, a.sizes.split(",")):
            trunk.rows(x[:b])
            t = time.perf_counter()
            for s in range(0, a.images, b):
                trunk.rows(x[s : s + b])
            line.append(f"batch {b}: {a.images / (time.perf_counter() - t):.1f}")
        print(f"{a.model} {a.engine} {a.precision}, round {rnd}: " + ", ".join(line) + " images/s", flush=True)


if __name__ == "__main__":
    main()
