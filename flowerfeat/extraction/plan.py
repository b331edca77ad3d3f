"""Planning a split, before any image is read: which rows of the previous file stay valid, which batches this rank
computes, where an interrupted run resumes. Pure bookkeeping, testable without a trunk.

A split's *units* are its images times their views: unit ``u`` is image ``u // (1 + views)``, view
``u % (1 + views)`` (view 0 is the centre crop). Units whose rows the previous finished file already holds are
reused; the others are cut into batches of ``batch_size`` in unit order, and batch ``i`` belongs to rank
``i % world``, so torchrun's ranks form the very batches one process would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flowerfeat import store
from flowerfeat.data import Split
from flowerfeat.errors import FlowerfeatError
from flowerfeat.extraction.shards import Dist


@dataclass(frozen=True)
class Previous:
    """The finished file a split's rows may be reused from."""

    path: Path | None
    meta: dict | None  # None: no file, or one that cannot be used (corrupt, unfinished, older format): rebuilt
    elsewhere: bool = False  # another data set's cache (or 0.2's layout) holding these very images

    @classmethod
    def find(cls, final: Path) -> Previous:
        if not final.is_file():
            return cls(None, None)
        try:
            return cls(final, store.read_meta(final))
        except FlowerfeatError:
            return cls(final, None)

    @classmethod
    def found_again(cls, copies: list[Path], meta: dict, split: Split) -> Previous | None:
        """Of the same trunk's files for other data sets, the one holding most of ``split``'s very images (the same
        path in the data set, size and modification time): the rows of a data set moved or renamed. Nothing there
        is changed; the rows are copied."""
        keys = {(it.relpath, 0, it.size, it.mtime_ns) for it in split.items}
        best, best_n = None, 0
        for path in copies:
            try:
                old = store.read_meta(path)
            except FlowerfeatError:
                continue
            if old["model_key"] != meta["model_key"] or old["classes"] != meta["classes"]:
                continue
            n = len(keys & set(store.row_keys(path)))
            if n > best_n:
                best, best_n = cls(path, old, elsewhere=True), n
        return best


@dataclass(frozen=True)
class Reuse:
    """What the previous file gives: unit -> its row there, why the rest is (re)extracted, and how many of its rows
    are dropped because their images are gone or changed."""

    rows: dict[int, int]
    reason: str
    removed: int = 0


def reusable_rows(prev: Previous, meta: dict, split: Split) -> Reuse:
    """The rows of the previous file that stay valid for the split described by ``meta``."""
    old = prev.meta
    if old is None:  # a corrupt or unfinished file is simply rebuilt
        return Reuse({}, "existing file unusable: rebuilding it" if prev.path else "")
    # Rows are keyed by (path, view, size, mtime): a different --views count still reuses the views both have.
    if old["model_key"] != meta["model_key"] or old["classes"] != meta["classes"]:
        return Reuse({}, "re-extracting: " + store.describe_difference(old, meta))
    old_rows = store.row_keys(prev.path)
    nv = 1 + meta["views"]
    # Augmented views are only valid under the same seed; centre crops (view 0) always are.
    same_views = old["view_seed"] == meta["view_seed"] and old.get("view_scale") == meta.get("view_scale")
    reusable_views = nv if same_views else 1
    reuse = {}
    for idx, item in enumerate(split.items):
        for v in range(reusable_views):
            r = old_rows.get((item.relpath, v, item.size, item.mtime_ns))
            if r is not None:
                reuse[idx * nv + v] = r
    removed = len(old_rows) - len(reuse)
    if old["views"] != meta["views"]:
        return Reuse(reuse, "views changed", removed)
    if old.get("compression", "none") != meta["compression"]:
        return Reuse(reuse, "compression changed: rewriting from cached rows", removed)
    if len(reuse) == len(old_rows) == len(split.items) * nv:
        return Reuse(reuse, "same images and settings, older fingerprint: rewriting from cached rows")
    return Reuse(reuse, "image list changed", removed)


@dataclass(frozen=True)
class WorkPlan:
    """One rank's share of a split: which units are reused, which batches it computes, where it resumes."""

    reuse: dict[int, int]  # unit -> row of the previous finished file
    batches: list[list[int]]  # this rank's batches of units, in order
    resume_at: int  # batches an earlier run of this rank already committed

    @property
    def remaining(self) -> list[list[int]]:
        return self.batches[self.resume_at :]

    @property
    def done_before(self) -> int:
        """Units already finished when this run starts: reused ones and committed batches."""
        return len(self.reuse) + sum(len(b) for b in self.batches[: self.resume_at])

    @property
    def total(self) -> int:
        return len(self.reuse) + sum(len(b) for b in self.batches)

    @property
    def computed(self) -> int:
        """Units this run sends through the trunk."""
        return sum(len(b) for b in self.remaining)


def plan_work(n_units: int, reuse: dict[int, int], batch_size: int, dist: Dist, committed: int = 0) -> WorkPlan:
    """Batches of the units not reused, interleaved over the ranks: the same batches for any number of ranks."""
    todo = [u for u in range(n_units) if u not in reuse]
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    return WorkPlan(reuse=reuse, batches=batches[dist.rank :: dist.world], resume_at=committed)
