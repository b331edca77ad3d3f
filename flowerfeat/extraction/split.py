"""One split brought up to date: plan (what is reused, what this rank computes, where it resumes) -> the loop ->
merge into the finished file."""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from flowerfeat import store
from flowerfeat.data import Split
from flowerfeat.extraction.job import Job, split_meta, split_views
from flowerfeat.extraction.plan import Previous, plan_work, reusable_rows
from flowerfeat.extraction.reader import make_loader
from flowerfeat.extraction.runner import run_with_progress
from flowerfeat.extraction.shards import Dist, merge, open_shard, shard_header


@dataclass
class SplitResult:
    """What bringing one split's file up to date did, and where the time went."""

    split: str
    path: Path
    status: str  # "up to date", "extracted", "resumed", "updated"
    reason: str
    rows: int
    computed: int  # units that went through the trunk in this run
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of the unreadable images
    reused: int = 0  # rows copied from the previous file
    removed: int = 0  # rows of the previous file whose images are gone (or changed)
    done_before: int = 0  # units an interrupted earlier run had finished
    seconds: float = 0.0
    read_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0
    trunk_s: float = 0.0  # building the trunk (weights, engine), when this split was the first to need it
    loop_s: float = 0.0  # the extraction loop, workers' start included
    finish_s: float = 0.0  # merging the shard log into the finished file


def _engine_file_made_again(job: Job, old: dict, calibrate_on: Split | None) -> tuple[str, bool] | None:
    """Where the kept engine file of an up-to-date split is missing or damaged, it is made again now (so predict
    finds it): (what happened, whether the split's rows still hold); None where it was intact. fp32 rows always
    hold; int8 rows only when the int8 trunk made again is the very file they came from."""
    lost = job.engine_file_lost()
    if lost is None:
        return None
    made = job.trunk(calibrate_on).recipe.artefact or {}
    if job.recipe.precision != "int8" or made.get("sha256") == (old.get("quantized_model") or {}).get("sha256"):
        return f"{lost} was missing or damaged: made again", True
    return f"{lost} was missing or damaged and the int8 trunk made again differs", False


def extract_split(job: Job, split: Split, dist: Dist = Dist(), calibrate_on: Split | None = None) -> SplitResult:
    """Bring ``<folder>/<split>.h5`` up to date: nothing if its fingerprint matches, else extract what is missing
    (an int8 trunk is calibrated on ``calibrate_on``, the run's training split, when it does not exist yet)."""
    t_start = time.perf_counter()
    final = store.split_file(job.folder, split.name)
    meta = split_meta(job, split)
    prev = Previous.find(final)
    if prev.meta is not None and prev.meta.get("fingerprint") == meta["fingerprint"]:
        remade = _engine_file_made_again(job, prev.meta, calibrate_on)
        if remade is None or remade[1]:
            rows, skipped = store.count_rows(final), store.read_skipped(final)
            why = "fingerprint matches" + (f"; {remade[0]}" if remade else "")
            return SplitResult(split.name, final, "up to date", why, rows, 0, skipped)
        prev = Previous(final, None)  # rows of another int8 trunk: extracted again with this one
        job.reporter.status(f"{split.name}: {remade[0]}: extracting again")
    if prev.path is None:  # a data set moved or renamed keeps its rows (another data set's cache stays as it is)
        prev = Previous.found_again(store.other_copies(job.folder, split.name), meta, split) or prev
    reuse = reusable_rows(prev, meta, split)
    if prev.elsewhere:
        reuse = dataclasses.replace(reuse, reason=f"rows found again in {prev.path.parent}", removed=0)
    t_trunk = time.perf_counter()
    meta.update(job.trunk(calibrate_on).recipe.to_attrs())  # built (weights checked) before anything is written
    t_trunk = time.perf_counter() - t_trunk
    n_views = split_views(job.cfg, split)
    header = shard_header(meta, job.batch_size, len(split.items) * (1 + n_views) - len(reuse.rows), dist)
    log = open_shard(final, header)
    plan = plan_work(len(split.items) * (1 + n_views), reuse.rows, job.batch_size, dist, committed=log.batches)
    status = "resumed" if plan.resume_at else ("updated" if reuse.rows else "extracted")
    reason = reuse.reason + (f"; discarded {log.discarded}" if log.discarded else "")
    result = SplitResult(split.name, final, status, reason, 0, plan.computed, reused=len(reuse.rows))
    result.removed, result.done_before, result.trunk_s = reuse.removed, plan.done_before - len(reuse.rows), t_trunk
    if plan.resume_at or reuse.rows:
        why = f" ({reason})" if reason else ""
        job.reporter.status(f"{split.name}: {plan.done_before:,} of {plan.total:,} images already done{why}")

    def loader(batches):
        return make_loader(split, n_views, job.cfg.view_seed, batches, preprocessing=job.recipe.preprocessing,
                           mode=job.mode, device=job.device, workers=job.workers,
                           view_scale=job.cfg.view_scale)  # fmt: skip

    times = run_with_progress(split.name, plan.done_before, plan.total, plan.remaining, loader, job.trunk, log,
                              job.batch_size, job.reporter)  # fmt: skip
    result.read_s, result.compute_s, result.write_s, result.loop_s = (
        times.read_s, times.compute_s, times.write_s, times.loop_s
    )  # fmt: skip
    t_finish = time.perf_counter()
    dist.barrier()
    if dist.rank == 0:
        result.skipped, result.rows = merge(final, prev.path, meta, split, reuse.rows, header)
        shutil.rmtree(store.partial_dir(final), ignore_errors=True)
    result.finish_s = time.perf_counter() - t_finish
    dist.barrier()
    result.seconds = time.perf_counter() - t_start
    return result
