"""Choose fit-head --train-top's defaults on the training images alone: each candidate setting trains on 80 % of the
training images (all their cached views) and is scored, epoch by epoch, on the other 20 % (centre crops), for a few
seeds; the test split is never read. Prints one line per candidate and a table (docs/heads.md has the figures).

    python scripts/top_settings.py data/features/flower_photos-.../timm-...-blocks.5-.../train.h5 \\
        --grid "epochs=4,6 lr_ratio=0.1,0.3 bn=update,freeze" --seeds 0 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from flowerfeat import fit_top
from flowerfeat.config import FitConfig
from flowerfeat.fit_top import fit_top as train_top

# what a grid key sets: a FitConfig field, or one of fit_top's module settings
MODULE_KEYS = {"lr_ratio": "TOP_LR_RATIO", "bn": "BN_STATISTICS", "top_lr": "TOP_LR"}


def run(train: Path, setting: dict, seed: int, val_fraction: float) -> dict:
    fields = {k: v for k, v in setting.items() if k not in MODULE_KEYS}
    for key, name in MODULE_KEYS.items():
        if key in setting:
            setattr(fit_top, name, setting[key])
    cfg = FitConfig(features=train, train_top=True, seed=seed, val_fraction=val_fraction, **fields)
    t = time.perf_counter()
    result, _ = train_top(cfg, lambda s: None)
    return {"setting": setting, "seed": seed, "val_by_epoch": [h["val_acc"] for h in result.history],
            "seconds": time.perf_counter() - t}  # fmt: skip


def grid(text: str) -> list[dict]:
    """``"epochs=4,6 bn=update,freeze"`` -> every combination, values as numbers where they are."""
    axes = []
    for part in text.split():
        key, values = part.split("=")
        axes.append([(key, _value(v)) for v in values.split(",")])
    return [dict(c) for c in itertools.product(*axes)]


def _value(v: str):
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            continue
    return v


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("train", type=Path)
    ap.add_argument("--grid", default="epochs=4")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--out", type=Path, default=Path("top_settings.jsonl"))
    a = ap.parse_args()
    defaults = {name: getattr(fit_top, name) for name in MODULE_KEYS.values()}
    for setting in grid(a.grid):
        rows = [run(a.train, setting, seed, a.val_fraction) for seed in a.seeds]
        for name, value in defaults.items():  # each candidate starts from the module's own settings
            setattr(fit_top, name, value)
        last = sum(r["val_by_epoch"][-1] for r in rows) / len(rows)
        line = {"setting": setting, "val_last_mean": last, "runs": rows}
        print(json.dumps(setting), f"validation accuracy, last epoch, mean of {len(rows)} seeds: {100 * last:.2f} %",
              "by epoch:", [[round(100 * v, 1) for v in r["val_by_epoch"]] for r in rows], flush=True)  # fmt: skip
        with open(a.out, "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
