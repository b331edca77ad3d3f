"""Extraction with a deliberately slow tiny trunk, run in subprocesses by the kill, lock and torchrun tests."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TinyBackbone, TinyTrunk  # noqa: E402

from flowerfeat import backbones  # noqa: E402
from flowerfeat.config import ExtractConfig  # noqa: E402
from flowerfeat.extraction import dist_from_env, run_extraction  # noqa: E402


class SlowTrunk(TinyTrunk):
    def forward(self, x):
        time.sleep(float(os.environ.get("SLOW_TRUNK_S", "0.05")))  # so a kill lands mid-run
        return super().forward(x)


if __name__ == "__main__":
    data, out = sys.argv[1], sys.argv[2]
    backbones.register("tiny", lambda: TinyBackbone(SlowTrunk))  # the tiny model, slowly
    cfg = ExtractConfig(data=Path(data), out=Path(out), model="tiny", weights="none", batch_size=2, workers=0,
                        engine="torch")  # fmt: skip
    dist, shutdown = dist_from_env()  # torchrun: one shard per rank
    try:
        for r in run_extraction(cfg, dist=dist):
            print(f"rank {dist.rank}:", r.split, r.status, r.computed)
    finally:
        shutdown()
