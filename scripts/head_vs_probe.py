"""The linear default head against converged probes on one cache: fit-head's default head (seeds 0-2) and
scikit-learn's logistic regression (L-BFGS, C in 0.01, 0.1, 1) on the training rows, each scored on the test split.
Prints one line each and the gap to the best probe (docs/heads.md has the figures).

One test split of 550 photos moves a probe or a head by a point between feature sets that are alike, so ``--folds K``
also scores both by stratified K-fold cross-validation over the centre crops of both splits pooled (fold k's head
is seeded k), which averages over K splits instead of one.

    python scripts/head_vs_probe.py data/features/flower_photos-.../timm-tf_efficientnet_lite0-.../ --folds 5
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

import flowerfeat
from flowerfeat import store

CS = (0.01, 0.1, 1.0)


def accuracy(head, rows) -> float:
    return float((head.predict(rows.X) == rows.y).mean())


def on_the_test_split(train, test, seeds) -> None:
    heads = []
    for seed in seeds:
        heads.append(accuracy(flowerfeat.fit_head(train, seed=seed), test))
        print(f"default head, seed {seed}: {100 * heads[-1]:.1f} %", flush=True)
    probes = {}
    for c in CS:
        probes[c] = accuracy(flowerfeat.fit_head(train, solver="lbfgs", C=c), test)
        print(f"probe C={c:g}: {100 * probes[c]:.1f} %", flush=True)
    best = max(probes, key=probes.get)
    mean = float(np.mean(heads))
    print(f"default head mean {100 * mean:.1f} %; best probe {100 * probes[best]:.1f} % (C={best:g}); "
          f"gap {100 * (probes[best] - mean):.1f} points")  # fmt: skip


def cross_validated(train, test, folds: int) -> None:
    """Mean accuracy over ``folds`` stratified folds of the pooled centre crops: the default head and each probe."""
    from sklearn.model_selection import StratifiedKFold

    centre = train.views == 0
    X, y = np.concatenate([train.X[centre], test.X]), np.concatenate([train.y[centre], test.y])

    def rows(index):
        return dataclasses.replace(train, X=X[index], y=y[index], paths=[str(i) for i in index],
                                   views=np.zeros(len(index), train.views.dtype))  # fmt: skip

    scores = {"head": [], **{c: [] for c in CS}}
    for k, (fit, held) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=0).split(X, y)):
        fit, held = rows(fit), rows(held)
        scores["head"].append(accuracy(flowerfeat.fit_head(fit, seed=k), held))
        for c in CS:
            scores[c].append(accuracy(flowerfeat.fit_head(fit, solver="lbfgs", C=c), held))
    mean = {key: 100 * float(np.mean(v)) for key, v in scores.items()}
    best = max(CS, key=mean.get)
    print(f"{folds}-fold cross-validation over {len(y)} images: default head {mean['head']:.2f} %; probes "
          + ", ".join(f"C={c:g} {mean[c]:.2f} %" for c in CS) + f"; gap to the best {mean[best] - mean['head']:.2f} "
          "points; per fold (probe - head): " + ", ".join(f"{100 * (p - h):+.1f}" for h, p in
                                                          zip(scores["head"], scores[best])))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path, help="a cache folder holding train.h5 and test.h5")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--folds", type=int, default=0, help="also cross-validate over this many folds (0: not)")
    a = ap.parse_args()
    test = store.load_features(a.folder / "test.h5")
    train = store.load_features(a.folder / "train.h5")
    print(f"{train.meta['model']} {train.meta['layer']} ({train.meta['precision']} on {train.meta['engine']}): "
          f"{len(train.y)} training rows, {len(test.y)} test images")  # fmt: skip
    on_the_test_split(train, test, a.seeds)
    if a.folds:
        cross_validated(train, test, a.folds)


if __name__ == "__main__":
    main()
