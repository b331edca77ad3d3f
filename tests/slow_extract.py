"""Run by test_store's kill test in a subprocess: extraction with a deliberately slow tiny trunk."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TinyTrunk  # noqa: E402

from flowerfeat.config import ExtractConfig  # noqa: E402
from flowerfeat.extract import run_extraction  # noqa: E402


class SlowTrunk(TinyTrunk):
    def forward(self, x):
        time.sleep(float(os.environ.get("SLOW_TRUNK_S", "0.05")))  # so a kill lands mid-run
        return super().forward(x)


if __name__ == "__main__":
    data, out = sys.argv[1], sys.argv[2]
    cfg = ExtractConfig(data=Path(data), out=Path(out), weights="none", batch_size=2, workers=0)
    for r in run_extraction(cfg, trunk=SlowTrunk().eval()):
        print(r.split, r.status, r.computed)
