"""What is on disk, for `flowerfeat runs`: every cache (its data set, model, cut, splits and rows, when) and every
head fitted on it (its settings, its test or validation accuracy, when), 0.2's layout included."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from flowerfeat import store
from flowerfeat.errors import FlowerfeatError


@dataclass
class HeadRecord:
    path: str
    model: str = ""
    layer: str = ""
    accuracy: float | None = None  # on the test split beside its features, else the validation split
    correct: int = 0
    total: int = 0
    split: str = ""  # what the accuracy is measured on: test or validation
    created: str = ""
    error: str = ""  # why it could not be read or scored


@dataclass
class CacheRecord:
    folder: str
    data: str  # the --data it was extracted from
    model: str = ""
    layer: str = ""
    weights: str = ""
    rows: dict[str, int] = field(default_factory=dict)  # split -> rows
    created: str = ""
    old_layout: bool = False  # flowerfeat 0.2's <out>/<trunk>/: `features` reuses its rows in the new layout
    heads: list[HeadRecord] = field(default_factory=list)


def head_record(path: Path) -> HeadRecord:
    """A head's record, scored on the test (or validation) split beside its training features."""
    from flowerfeat.heads import Head
    from flowerfeat.report import evaluate

    try:
        head = Head.load(path)
        when = str(head.meta.get("created", ""))[:16].replace("T", " ")
        record = HeadRecord(str(path), head.model, head.layer, created=when)
        train = Path(head.meta["config"]["features"])
        if not any(store.sibling_split(train, s).is_file() for s in ("test", "val")):
            return record  # nothing held out beside its features: not scored
        ev = evaluate(head)
    except FlowerfeatError as e:
        return HeadRecord(str(path), error=str(e))
    record.accuracy, record.correct, record.total, record.split = ev.accuracy, ev.correct, ev.total, ev.split
    return record


def cache_record(folder: Path, root: Path) -> CacheRecord:
    files = store.split_files(folder)
    metas = {}
    for f in files:
        try:
            metas[f.stem] = store.read_meta(f)
        except FlowerfeatError:
            continue
    first = next(iter(metas.values()), {})
    data = store.dataset_of(folder) or first.get("data_root", "?")
    record = CacheRecord(str(folder), data, first.get("model", "?"), first.get("layer", "?"), first.get("weights", ""))
    order = sorted(metas, key=lambda s: (("train", "val", "test").index(s) if s in ("train", "val", "test") else 3, s))
    record.rows = {split: store.count_rows(store.split_file(folder, split)) for split in order}
    record.created = max((str(m.get("created", ""))[:16].replace("T", " ") for m in metas.values()), default="")
    record.old_layout = folder.parent.resolve() == Path(root).resolve()
    record.heads = [head_record(h) for h in store.heads_under(folder)]
    return record


def inventory(root: Path, legacy_runs: Path = store.LEGACY_RUNS) -> tuple[list[CacheRecord], list[HeadRecord]]:
    """(every cache under ``root`` with its heads, the heads of 0.2's ``data/runs``)."""
    caches = [cache_record(f, root) for f in store.cache_folders(root)]
    return caches, [head_record(h) for h in store.heads_under(legacy_runs)]


def runs_lines(caches: list[CacheRecord], old_heads: list[HeadRecord]) -> list[str]:
    """The inventory as lines: a data set, its caches, each cache's heads, newest first."""
    lines = []
    for data in sorted({c.data for c in caches}):
        lines.append(f"data set {data}")
        for c in [c for c in caches if c.data == data]:
            rows = " + ".join(f"{n:,} {split}" for split, n in c.rows.items())
            old = "  (flowerfeat 0.2's layout: `flowerfeat features` reuses its rows)" if c.old_layout else ""
            lines.append(f"  {c.model} {c.layer}: {rows} rows in {c.folder}, {c.created}{old}")
            lines += [f"    {_head_line(h)}" for h in c.heads]
    if old_heads:
        lines.append(f"heads of flowerfeat 0.2 in {store.LEGACY_RUNS} (pass --head PATH to use one):")
        lines += [f"  {_head_line(h)}" for h in old_heads]
    return lines or ["no caches or heads yet: run `flowerfeat features`, then `flowerfeat fit-head`"]


def _head_line(h: HeadRecord) -> str:
    if h.error:
        return f"{h.path}: {h.error}"
    score = f"{h.split} {100 * h.accuracy:.1f} % ({h.correct}/{h.total})" if h.accuracy is not None else "not scored"
    return f"{h.path}: {score}, fitted {h.created}"


def as_dicts(caches: list[CacheRecord], old_heads: list[HeadRecord]) -> dict:
    return {"caches": [asdict(c) for c in caches], "old_heads": [asdict(h) for h in old_heads]}
