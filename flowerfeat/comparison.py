"""Which model for my photos: each candidate's features of a sample of the user's own training images, scored by the
same stratified cross-validation folds with the default head and a converged probe, beside its measured speed."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from flowerfeat import store
from flowerfeat.backbones import get_backbone, parse_choice, suggested_models
from flowerfeat.config import ExtractConfig
from flowerfeat.data import Split
from flowerfeat.layouts import scan_data, stratified_order
from flowerfeat.errors import FlowerfeatError
from flowerfeat.progress import Reporter

PROBE_C = 0.1  # the probe: full-batch logistic regression (L-BFGS), L2 strength 1/C
TOP = "+top"  # MODEL@CUT+top: the trained top of the trunk above a cut below the top


@dataclass
class Row:
    """One candidate's line of the table (``error`` set: it could not run, and why)."""

    candidate: str  # as given: MODEL or MODEL@LAYER
    model: str
    layer: str = ""
    dim: int = 0
    head_mean: float | None = None  # cross-validated accuracy of the default head
    head_std: float | None = None  # spread (standard deviation) over the folds
    probe_mean: float | None = None
    probe_std: float | None = None
    images_per_s: float | None = None  # extraction on this machine, in the run that extracted the sample
    speed_measured: str = ""  # "this run" or when an earlier run measured it
    full_extract_s: float | None = None  # the whole data set's training images at that speed
    full_disk_bytes: int | None = None  # their rows, as stored
    fit_s: float | None = None  # fitting the default head (the trained top, for MODEL@CUT+top) on a fold
    on_front: bool = False  # no other candidate is both at least as accurate and at least as fast
    error: str = ""


@dataclass
class Comparison:
    """What ``compare`` found: one Row per candidate, the sample and folds behind them, and the time it took.

    Example::

        result = flowerfeat.compare("my_photos", ["vgg16@pool5-gap", "resnet50"])
        best = max((r for r in result.rows if not r.error), key=lambda r: r.head_mean)
        print("\\n".join(flowerfeat.comparison.table_lines(result)))
    """

    rows: list[Row]
    sample: int
    images: int  # training images in the data set
    folds: int
    seconds: float
    out: Path
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def sample_split(data: Path, n: int, seed: int, test_fraction: float = 0.0) -> tuple[Split, int]:
    """The first ``n`` training images in the stratified order (all of them when fewer), as a split named sample;
    and how many training images the data set has."""
    train = scan_data(Path(data), ("train",), test_fraction)["train"]
    order = stratified_order(train, seed)[:n]
    if len({train.items[i].label for i in order}) < 2:
        raise FlowerfeatError(f"{data}: a sample of {n} images holds fewer than 2 classes; raise --sample")
    return replace(train, name="sample", items=tuple(train.items[i] for i in order)), len(train.items)


def trained_top(choice: str) -> tuple[str, bool]:
    """``MODEL@CUT+top`` -> (``MODEL@CUT``, True): the top of the trunk trains above the cut (fit-head --train-top)."""
    return (choice[: -len(TOP)], True) if choice.endswith(TOP) else (choice, False)


def candidate_config(base: ExtractConfig, choice: str, weights: dict[str, str]) -> ExtractConfig:
    model, layer = parse_choice(trained_top(choice)[0])
    return base.replace(model=model, layer=layer, weights=weights.get(model, weights.get(choice, "imagenet")))


def cv_scores(X: np.ndarray, y: np.ndarray, folds, meta: dict, seed: int, train_top: bool = False):
    """Accuracy of the default head (the trained top with its head, for ``train_top``) and of the probe (None for a
    trained top) on each fold's held-out rows; and the seconds a default head took to fit, per fold."""
    from flowerfeat.store import Features
    from flowerfeat.train import fit_head

    head, probe, seconds = [], [], []
    for train_idx, val_idx in folds:
        rows = Features(X[train_idx], y[train_idx], meta["classes"], [], np.zeros(len(train_idx), np.int8), [], meta)
        t = time.perf_counter()
        fitted = fit_head(rows, seed=seed, train_top=train_top)
        seconds.append(time.perf_counter() - t)
        head.append(float((fitted.predict(X[val_idx]) == y[val_idx]).mean()))
        if not train_top:
            fitted = fit_head(rows, seed=seed, solver="lbfgs", C=PROBE_C)
            probe.append(float((fitted.predict(X[val_idx]) == y[val_idx]).mean()))
    return head, probe or None, float(np.mean(seconds))


def make_folds(sample: Split, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The same stratified, seeded k folds for every candidate, as indices into the sample's items."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.array([it.label for it in sample.items])
    k = min(k, int(np.bincount(labels).min()))
    if k < 2:
        raise FlowerfeatError("every class needs at least 2 sample images for cross-validation; raise --sample")
    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels))


def score_candidate(
    cfg: ExtractConfig, choice: str, sample: Split, folds, n_images: int, seed: int, reporter: Reporter
) -> Row:
    """Extract (or reuse) the candidate's sample features, time them, and score them on the folds."""
    from flowerfeat.extraction import run_extraction
    from flowerfeat.store import load_features

    backbone = get_backbone(cfg.model)
    cut = backbone.cut(cfg.layer)
    train_top = trained_top(choice)[1]
    row = Row(choice, backbone.name, cut.name + (TOP if train_top else ""), cut.dim)
    reporter.status(f"{choice}: {backbone.name} at {cut.name} ({cut.dim}-d{', the top trained' if train_top else ''})")
    result = run_extraction(cfg.replace(layer=cut.name), reporter, splits={"sample": sample})[0]
    row.images_per_s, row.speed_measured = _speed(result)
    features = load_features(result.path)
    rows = _rows_of(features, sample, folds)
    head, probe, row.fit_s = cv_scores(features.X, features.y, rows, features.meta, seed, train_top)
    row.head_mean, row.head_std = float(np.mean(head)), float(np.std(head))
    if probe is not None:
        row.probe_mean, row.probe_std = float(np.mean(probe)), float(np.std(probe))
    if row.images_per_s:
        row.full_extract_s = n_images / row.images_per_s
    row.full_disk_bytes = n_images * cut.dim * np.dtype(features.meta["dtype"]).itemsize
    return row


def _rows_of(features, sample: Split, folds) -> list[tuple[np.ndarray, np.ndarray]]:
    """The folds (indices into the sample's items) as rows of ``features``; an unreadable image has no row."""
    at = {p: r for r, p in enumerate(features.paths)}

    def rows(part) -> np.ndarray:
        paths = (sample.items[i].relpath for i in part)
        return np.array([at[p] for p in paths if p in at], dtype=np.int64)

    return [(rows(train), rows(val)) for train, val in folds]


def _speed(result) -> tuple[float | None, str]:
    """Images/s of this run's extraction, kept beside the features; an up-to-date rerun reads the earlier one."""
    record = store.speed_file(result.path)
    if result.computed and result.loop_s > 0:
        ips = result.computed / result.loop_s
        measured = {"images_per_s": ips, "images": result.computed, "at": time.ctime()}
        store.write_text(record, json.dumps(measured) + "\n")
        return ips, "this run"
    if record.is_file():
        earlier = json.loads(record.read_text())
        return float(earlier["images_per_s"]), f"earlier run ({earlier['at']})"
    return None, ""


def mark_front(rows: list[Row]) -> None:
    """``on_front`` for each candidate that no other beats on both accuracy (default head) and images/s."""
    scored = [r for r in rows if r.head_mean is not None and r.images_per_s]
    for r in scored:
        r.on_front = not any(
            o is not r and o.head_mean >= r.head_mean and o.images_per_s >= r.images_per_s
            and (o.head_mean > r.head_mean or o.images_per_s > r.images_per_s)
            for o in scored
        )  # fmt: skip


def compare(
    data: str | Path,
    models: list[str] | tuple[str, ...] = (),
    weights: dict[str, str] | None = None,
    *,
    sample: int = 500,
    folds: int = 5,
    seed: int = 0,
    out: str | Path = Path("data/compare"),
    progress: bool | Reporter = False,
    **options,
) -> Comparison:
    """Measure the candidate models (``MODEL`` or ``MODEL@LAYER``; default: the families' suggestions,
    ``backbones.suggested_models()``; a candidate whose weights cannot be had is reported in its row) on a stratified,
    seeded sample of ``data``'s training images: each one's features are extracted once (cached under ``out``, so a
    rerun or a larger sample reuses them), timed, and scored by the same stratified ``folds``-fold cross-validation
    with the default head and a converged probe. ``weights`` maps a model (or a candidate) to a weights file;
    ``options`` are ``ExtractConfig`` fields (``batch_size``, ``engine``, ``precision``, ...).

    Example::

        result = flowerfeat.compare("my_photos", ["vgg16@pool5-gap", "resnet50"], {"vgg16@pool5-gap": "vgg16_conv.pth"})
        for row in result.rows:
            print(row.model, row.layer, row.head_mean, row.images_per_s, row.on_front)
    """
    from flowerfeat.progress import LineReporter

    reporter = progress if isinstance(progress, Reporter) else LineReporter() if progress else Reporter()
    t0 = time.perf_counter()
    base = ExtractConfig(data=Path(data), out=Path(out), **options)
    part, n_images = sample_split(Path(data), sample, seed, base.test_fraction)
    fold_list = make_folds(part, folds, seed)
    rows = []
    for choice in models or suggested_models():
        try:
            cfg = candidate_config(base, choice, weights or {})
            rows.append(score_candidate(cfg, choice, part, fold_list, n_images, seed, reporter))
        except FlowerfeatError as e:  # this candidate cannot run here: say why in its row, go on with the others
            rows.append(Row(choice, parse_choice(choice)[0], error=str(e)))
            reporter.status(f"{choice}: skipped ({e})")
    mark_front(rows)
    return Comparison(rows, len(part.items), n_images, len(fold_list), time.perf_counter() - t0, Path(out))


def table_lines(c: Comparison) -> list[str]:
    """The comparison as a table, most accurate first; the front marked with *."""
    gib = 1 << 30
    lines = [
        f"{c.sample} of {c.images:,} training images, {c.folds}-fold stratified cross-validation; "
        f"images/s measured on this machine; whole-set time and size for the {c.images:,} training images",
        f"  {'model':<28} {'layer':<14} {'dim':>6}  {'default head':>14}  {'probe':>14}  {'fit s':>6}  "
        f"{'images/s':>8}  {'whole set':>9}  {'disk':>8}",
    ]
    ranked = sorted(c.rows, key=lambda r: -(r.head_mean if r.head_mean is not None else -1))
    for r in ranked:
        if r.error:
            lines.append(f"  {r.candidate:<28} could not run: {r.error}")
            continue
        speed = f"{r.images_per_s:8.2f}" if r.images_per_s else f"{'?':>8}"
        whole = f"{r.full_extract_s / 60:7.1f} min" if r.full_extract_s else f"{'?':>11}"
        probe = f"{100 * r.probe_mean:6.1f} +- {100 * r.probe_std:4.1f}" if r.probe_mean is not None else f"{'-':>14}"
        fit = f"{r.fit_s:6.1f}" if r.fit_s is not None else f"{'?':>6}"
        lines.append(
            f"{'*' if r.on_front else ' '} {r.model:<28} {r.layer:<14} {r.dim:>6}  "
            f"{100 * r.head_mean:6.1f} +- {100 * r.head_std:4.1f}  {probe}  {fit}  {speed}  {whole}  "
            f"{r.full_disk_bytes / gib:5.2f} GiB"
        )
    lines.append(f"* on the accuracy-versus-speed front (no other is both as accurate and as fast); fit s: the default "
                 f"head's (or the trained top's) fit on one fold; {c.seconds:.0f} s in all")  # fmt: skip
    return lines


def figure(c: Comparison):
    """Cross-validated accuracy of the default head against images/s (log scale): each point numbered, the numbers
    named in a legend beside the plot (long names never leave the frame), the front drawn; a matplotlib Figure
    (no pyplot)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogLocator, NullFormatter

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    rows = [r for r in c.rows if r.head_mean is not None and r.images_per_s]
    blue, grey = "#0072B2", "#999999"
    for k, r in enumerate(rows, 1):
        ax.errorbar(r.images_per_s, 100 * r.head_mean, yerr=100 * r.head_std, fmt="o" if r.on_front else "s",
                    color=blue if r.on_front else grey, capsize=3, label=f"{k}  {r.model} {r.layer}")  # fmt: skip
        ax.annotate(str(k), (r.images_per_s, 100 * r.head_mean), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)  # fmt: skip
    front = sorted((r for r in rows if r.on_front), key=lambda r: r.images_per_s)
    ax.plot([r.images_per_s for r in front], [100 * r.head_mean for r in front], "--", color=blue)
    ax.set(xscale="log", xlabel="images/s on this machine (log)", ylabel="cross-validated accuracy, default head (%)")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 1, 2, 5, 10, 20, ...: labels that never touch
    ax.xaxis.set_major_formatter("{x:g}")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.15, y=0.15)
    ax.set_title(f"{c.sample} sample images, {c.folds}-fold cross-validation", fontsize=10)
    handles, _ = ax.get_legend_handles_labels()
    line = Line2D([], [], linestyle="--", color=blue, label="front: none both more accurate and faster")
    fig.legend(handles=[*handles, line], loc="outside right upper", fontsize=8, handlelength=3)
    return fig
