"""flowerfeat: transfer learning on cached features of a frozen trunk (extract once, fit the head in a second).

The library is the product; ``flowerfeat`` on the command line is one client of it::

    import flowerfeat

    files = flowerfeat.extract("data/flower_photos", layer="fc7")       # frozen trunk -> HDF5, once
    head = flowerfeat.fit_head(files["train"], epochs=2)                 # the new classifier[6], in a second
    print(flowerfeat.evaluate(head, files["test"]))                      # the textbook's per-class lines
    flowerfeat.Classifier.load(head.save("head.pt")).predict("rose.jpg")

Names are imported on first use, so ``import flowerfeat`` (and ``flowerfeat --help``) does not load torch.
"""

from __future__ import annotations

import importlib

from flowerfeat.config import ExtractConfig, FitConfig
from flowerfeat.errors import FlowerfeatError

__version__ = "0.2.0"  # the one place the version is written (pyproject.toml reads it)
# Bumped whenever the HDF5 layout changes; part of every feature fingerprint. 2: the model is recorded and keyed.
FORMAT_VERSION = 2

# public name -> module that defines it
_LAZY = {
    "extract": "flowerfeat.extraction",
    "Extraction": "flowerfeat.extraction",
    "load_features": "flowerfeat.store",
    "Features": "flowerfeat.store",
    "fit_head": "flowerfeat.train",
    "Head": "flowerfeat.heads",
    "evaluate": "flowerfeat.report",
    "Evaluation": "flowerfeat.report",
    "Classifier": "flowerfeat.predict",
    "Prediction": "flowerfeat.predict",
    "export_model": "flowerfeat.export",
    "compare": "flowerfeat.comparison",
    "Comparison": "flowerfeat.comparison",
    "LineReporter": "flowerfeat.progress",
    "Reporter": "flowerfeat.progress",
}
__all__ = [*_LAZY, "ExtractConfig", "FitConfig", "FlowerfeatError", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'flowerfeat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, "FORMAT_VERSION"])
