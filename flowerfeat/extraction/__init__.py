"""Extraction: a frozen trunk run once over every split into fingerprinted, resumable HDF5 files.

    job.py     the recipe resolved once, the cache folder, how the loop runs; the trunk built on first use
    plan.py    which cached rows stay valid, which batches this rank computes, where it resumes
    reader.py  the DataLoader (PIL in the readers, or JPEGs prepared on the device)
    runner.py  the loop: reader -> trunk -> writer, each step timed
    shards.py  torchrun's ranks, their shard logs, the final merge
    split.py   one split: plan -> loop -> merge
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from flowerfeat import store
from flowerfeat.config import ExtractConfig
from flowerfeat.data import Split
from flowerfeat.layouts import missing_classes, scan_data
from flowerfeat.extraction.job import Job, default_workers, make_job
from flowerfeat.extraction.shards import Dist, dist_from_env
from flowerfeat.extraction.split import SplitResult, extract_split
from flowerfeat.progress import LineReporter, Reporter

__all__ = ["Dist", "Extraction", "Job", "SplitResult", "default_workers", "dist_from_env", "extract",
           "make_job", "run", "run_extraction"]  # fmt: skip


def run_extraction(
    cfg: ExtractConfig, reporter: Reporter | None = None, dist: Dist = Dist(), splits: dict[str, Split] | None = None
) -> list[SplitResult]:
    """Extract every split of ``cfg`` (or the ``splits`` given, already scanned: a subset, for benchmarks)."""
    reporter = reporter or Reporter()
    store.check_writable(Path(cfg.out))
    job = make_job(cfg, dist, reporter)  # an unknown model, cut or weights file stops here
    if splits is None:
        with reporter.stage(f"scanning {cfg.data}") as found:
            splits = scan_data(Path(cfg.data), cfg.splits, cfg.test_fraction)  # structural errors stop here
            found.append(" + ".join(f"{len(s.items):,} {name}" for name, s in splits.items()) + " images")
            found.append(f"{len(next(iter(splits.values())).classes)} classes")
            found += [f"no {', '.join(m)} images in {s.name}" for s in splits.values() if (m := missing_classes(s))]
            if set(splits) == {"train"} and not cfg.splits:
                found.append("no test or validation split (--test-fraction 0.2 holds some training images out)")
    if job.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest convolutions
    made = [p for p in (job.folder.parent, job.folder) if not p.exists()]
    job.folder.mkdir(parents=True, exist_ok=True)
    try:
        with store.exclusive_lock(job.folder, f"features-rank{dist.rank}of{dist.world}"):
            store.mark_dataset(job.folder, cfg.data)
            job.settle_engine(measure=dist.world == 1)  # torchrun's ranks take a kept choice or the rule
            calibrate_on = splits.get("train") or next(iter(splits.values()))
            results = [extract_split(job, split, dist, calibrate_on) for split in splits.values()]
    except BaseException:
        store.discard_unused(made)  # a refused run leaves nothing behind; finished or partial work stays
        raise
    if dist.rank == 0:
        store.mark_latest(cfg.out, job.folder)  # what fit-head, report and predict pick by default
    return results


def run(cfg: ExtractConfig, reporter: Reporter | None = None) -> list[SplitResult]:
    """``run_extraction`` as this process's part of a torchrun job (or alone): joins the process group and leaves
    it, whatever happens."""
    dist, shutdown = dist_from_env()
    try:
        return run_extraction(cfg, reporter, dist)
    finally:
        shutdown()


class Extraction(Mapping):
    """What ``extract`` made: a mapping split -> finished feature file, and each split's ``SplitResult``.

    Example::

        files = flowerfeat.extract("data/flower_photos")
        files["train"]                   # Path('data/features/.../train.h5')
        files.results["train"].status    # 'extracted', 'resumed', 'updated' or 'up to date'
    """

    def __init__(self, results: list[SplitResult]):
        self.results = {r.split: r for r in results}

    def __getitem__(self, split: str) -> Path:
        return self.results[split].path

    def __iter__(self):
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __repr__(self) -> str:
        return "Extraction(" + ", ".join(f"{s}={r.path} ({r.rows} rows)" for s, r in self.results.items()) + ")"


def extract(
    data: str | Path = ExtractConfig.data,
    out: str | Path = ExtractConfig.out,
    layer: str | None = ExtractConfig.layer,
    weights: str = ExtractConfig.weights,
    *,
    progress: bool | Reporter = False,
    **options,
) -> Extraction:
    """Run a frozen trunk (``model``, VGG16 by default, cut at ``layer``) once over every split of ``data`` and cache
    the features in HDF5.

    ``options`` are ``ExtractConfig``'s other fields (``model``, ``splits``, ``batch_size``, ``views``, ``dtype``,
    ``device``, ...). Resumable and fingerprinted as ``flowerfeat features``: a second call with nothing changed
    does nothing, an interrupted one (Ctrl-C, a kernel interrupt) resumes at its last committed batch, unreadable
    images are skipped and recorded. ``progress=True`` prints plain progress lines to stderr; a ``Reporter`` gets
    every event. Under torchrun each rank takes its share. Raises ``FlowerfeatError`` with a one-line message for
    bad input.

    Example::

        files = flowerfeat.extract("data/flower_photos", layer="pool5-gap", weights="vgg16_features.pth")
        files = flowerfeat.extract("data/flower_photos", model="resnet50")   # its pooled pre-logits
        tr = flowerfeat.load_features(files["train"])
    """
    cfg = ExtractConfig.from_options("extract", options, data=Path(data), out=Path(out), layer=layer,
                                     weights=str(weights))  # fmt: skip
    reporter = progress if isinstance(progress, Reporter) else LineReporter() if progress else Reporter()
    return Extraction(run(cfg, reporter))
