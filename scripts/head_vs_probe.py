"""The linear default head against converged probes on one cache: fit-head's default head (seeds 0-2) and
scikit-learn's logistic regression (L-BFGS, C in 0.01, 0.1, 1) on the training rows' centre crops, each scored on
the test split. Prints one line each and the gap to the best probe (docs/heads.md has the figures).

    python scripts/head_vs_probe.py data/features/flower_photos-.../timm-tf_efficientnet_lite0-.../
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import flowerfeat
from flowerfeat import store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path, help="a cache folder holding train.h5 and test.h5")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = ap.parse_args()
    test = store.load_features(a.folder / "test.h5")
    train = store.load_features(a.folder / "train.h5")
    print(f"{train.meta['model']} {train.meta['layer']} ({train.meta['precision']} on {train.meta['engine']}): "
          f"{len(train.y)} training rows, {len(test.y)} test images")  # fmt: skip
    heads = []
    for seed in a.seeds:
        head = flowerfeat.fit_head(train, seed=seed)
        heads.append(float((head.predict(test.X) == test.y).mean()))
        print(f"default head, seed {seed}: {100 * heads[-1]:.1f} %", flush=True)
    probes = {}
    for c in (0.01, 0.1, 1.0):
        probe = flowerfeat.fit_head(train, solver="lbfgs", C=c)
        probes[c] = float((probe.predict(test.X) == test.y).mean())
        print(f"probe C={c:g}: {100 * probes[c]:.1f} %", flush=True)
    best = max(probes, key=probes.get)
    mean = float(np.mean(heads))
    print(f"default head mean {100 * mean:.1f} %; best probe {100 * probes[best]:.1f} % (C={best:g}); "
          f"gap {100 * (probes[best] - mean):.1f} points")  # fmt: skip


if __name__ == "__main__":
    main()
