"""Metrics, tables and figures for a head on a feature file: the textbook's lines, a confusion matrix, JSON, PNGs."""

from __future__ import annotations

import csv
import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from flowerfeat import runtime, store
from flowerfeat.heads import Head, check_compatible, score


@dataclass
class Evaluation:
    """A head's results on test features: ``str()`` gives the textbook's lines, ``to_dict()`` what
    ``flowerfeat report --json`` prints.

    Example::

        ev = flowerfeat.evaluate(head, test)
        ev.accuracy, ev.per_class["roses"]  # 0.864, (82, 93)
    """

    classes: list[str]
    y_true: np.ndarray  # (N,)
    y_pred: np.ndarray  # (N,)
    probs: np.ndarray  # (N, C)
    loss: float
    paths: list[str]
    data_root: str
    provenance: dict = field(default_factory=dict)  # layer, weights, head settings and files behind these figures
    split: str = "test"  # "test", or "validation" when the data set has no test split

    @property
    def label(self) -> str:
        """``Test`` or ``Validation``: what the figures are measured on, as the textbook's lines say it."""
        return self.split.capitalize()

    @property
    def correct(self) -> int:
        return int((self.y_true == self.y_pred).sum())

    @property
    def total(self) -> int:
        return len(self.y_true)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    @functools.cached_property
    def confusion_matrix(self) -> np.ndarray:
        """(C, C) counts: rows are the true class, columns the predicted one (computed once)."""
        from sklearn.metrics import confusion_matrix

        return confusion_matrix(self.y_true, self.y_pred, labels=list(range(len(self.classes))))

    @property
    def per_class(self) -> dict[str, tuple[int, int]]:
        """class -> (correct, total), read off the confusion matrix."""
        cm = self.confusion_matrix
        return {name: (int(cm[i, i]), int(cm[i].sum())) for i, name in enumerate(self.classes)}

    def to_dict(self) -> dict:
        return metrics(self)

    def __str__(self) -> str:
        return "\n".join(textbook_lines(self))

    def __repr__(self) -> str:
        return f"Evaluation(accuracy {self.accuracy:.1%} ({self.correct}/{self.total}), loss {self.loss:.4f})"


def evaluate(head: Head | str | Path, test: store.Features | str | Path | None = None) -> Evaluation:
    """Run a head over test features (centre crops only) after checking the two come from the same trunk;
    ``test`` defaults to the ``test.h5`` beside the features the head was fitted on, else (a data set with no test
    split) the ``val.h5`` there: its figures are then called validation accuracy.

    Example::

        ev = flowerfeat.evaluate(head, "data/features/vgg16-fc7-imagenet/test.h5")
        print(ev)             # the textbook's per-class lines
        ev.confusion_matrix   # (C, C)
    """
    head = head if isinstance(head, Head) else Head.load(head)
    if test is None:
        beside = Path(head.meta["config"]["features"])
        test = store.sibling_split(beside, "test")
        if not test.is_file() and store.sibling_split(beside, "val").is_file():
            test = store.sibling_split(beside, "val")
    fs = test if isinstance(test, store.Features) else store.load_features(store.find_features(test, "test"))
    check_compatible(head, fs.meta, fs.path or "test features")
    keep = fs.views == 0
    x, y = fs.X[keep], fs.y[keep]
    with runtime.threads(runtime.SMALL_WORK_THREADS if head.kind == "linear" else torch.get_num_threads()):
        loss, pred, probs = score(head.module, x, y)
    paths = [p for p, k in zip(fs.paths, keep) if k]
    split = "validation" if fs.meta.get("split") == "val" else "test"
    return Evaluation(
        list(fs.classes), y, pred, probs, loss, paths, fs.meta.get("data_root", ""), _provenance(head, fs), split
    )


def _provenance(head: Head, test: store.Features) -> dict:
    """Where the figures come from: the trunk (layer, weights), the head (its file and settings), the feature files."""
    trunk = head.meta["features"]
    return {
        "model": trunk["model"],
        "layer": trunk["layer"],
        "weights": trunk["weights"],
        "weights_sha256": trunk.get("weights_sha256") or "",
        "precision": trunk.get("precision"),
        "head": str(head.path or ""),
        "head_settings": _settings(head),
        "train_features": str(head.meta["config"].get("features", "")),
        "test_features": str(test.path or ""),
        "test_fingerprint": test.meta.get("fingerprint", ""),
    }


def _settings(head: Head) -> dict:
    """The head's settings as used: the options, with what it chose for those left to it (lr, dropout, average) and
    what chose its epoch."""
    used = {k: v for k, v in head.meta["config"].items() if k not in ("features", "out", "name", "replace_head")}
    used.update({k: head.metrics[k] for k in ("lr", "dropout", "average", "validation") if k in head.metrics})
    return used


def textbook_lines(ev: Evaluation) -> list[str]:
    """The textbook's report, computed over every test row (its loop is only right for full batches)."""
    t = ev.label
    lines = [f"{t} Loss: {ev.loss:.6f}", ""]
    for name, (correct, total) in ev.per_class.items():
        if total:
            lines.append(f"{t} Accuracy of {name:>5}: {100 * correct // total:2d}% ({correct:2d}/{total:2d})")
        else:
            lines.append(f"{t} Accuracy of {name:>5}: N/A (no {ev.split} examples)")
    overall = f"{100 * ev.correct // max(ev.total, 1):2d}% ({ev.correct:2d}/{ev.total:2d})"
    return lines + ["", f"{t} Accuracy (Overall): {overall}"]


def confusion_lines(ev: Evaluation) -> list[str]:
    """Confusion matrix as text: rows are the true class, columns the predicted one."""
    cm = ev.confusion_matrix
    w = max(max(len(c) for c in ev.classes), len(str(cm.max())) + 1, 6)
    head = " " * (w + 2) + "".join(f"{c[:w]:>{w + 1}}" for c in ev.classes)
    rows = [f"{c:>{w}}  " + "".join(f"{v:>{w + 1}d}" for v in r) for c, r in zip(ev.classes, cm)]
    return ["Confusion matrix (rows: true class, columns: predicted)", head, *rows]


class Mistake(NamedTuple):
    """A misclassified test image."""

    path: str
    true: str
    predicted: str
    probability: float  # of the predicted class
    p_true: float  # of the true class


def _wrong_rows(ev: Evaluation) -> list[int]:
    """Rows of the misclassified test images, the most confident prediction first."""
    wrong = np.flatnonzero(ev.y_true != ev.y_pred).tolist()
    return sorted(wrong, key=lambda i: -float(ev.probs[i, ev.y_pred[i]]))


def mistakes(ev: Evaluation) -> list[Mistake]:
    """The misclassified test images, most confident first."""
    return [
        Mistake(
            ev.paths[i],
            ev.classes[ev.y_true[i]],
            ev.classes[ev.y_pred[i]],
            float(ev.probs[i, ev.y_pred[i]]),
            float(ev.probs[i, ev.y_true[i]]),
        )  # fmt: skip
        for i in _wrong_rows(ev)
    ]


def confused_pairs(ev: Evaluation, k: int = 5) -> list[tuple[str, str, int]]:
    """The ``k`` most frequent (true, predicted, count) confusions."""
    cm = ev.confusion_matrix
    pairs = [(ev.classes[i], ev.classes[j], int(cm[i, j])) for i in range(len(cm)) for j in range(len(cm)) if i != j]
    return sorted((p for p in pairs if p[2]), key=lambda p: -p[2])[:k]


def confused_lines(ev: Evaluation) -> list[str]:
    pairs = confused_pairs(ev)
    if not pairs:
        return ["No test image misclassified."]
    width = max(len(f"{t} -> {p}") for t, p, _ in pairs)
    return ["Most confused (true -> predicted):"] + [f"  {f'{t} -> {p}':<{width}}  {n}" for t, p, n in pairs]


def write_errors(ev: Evaluation, path: Path) -> Path:
    """One CSV row per misclassified test image: path, true, predicted, probability, p_true."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(Mistake._fields)
        w.writerows((m.path, m.true, m.predicted, f"{m.probability:.6f}", f"{m.p_true:.6f}") for m in mistakes(ev))
    return path


def metrics(ev: Evaluation) -> dict:
    """Everything the report shows, machine-readable (``report --json``)."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = list(range(len(ev.classes)))
    p, r, f, s = precision_recall_fscore_support(ev.y_true, ev.y_pred, labels=labels, zero_division=0)
    per_class, counts = {}, ev.per_class
    for i, name in enumerate(ev.classes):
        correct, total = counts[name]
        per_class[name] = {
            "accuracy": correct / total if total else None,
            "correct": correct,
            "total": total,
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(s[i]),
        }
    averages = {}
    for how in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(
            ev.y_true, ev.y_pred, labels=labels, average=how, zero_division=0
        )
        averages[f"{how} avg"] = {"precision": float(ap), "recall": float(ar), "f1": float(af), "support": ev.total}
    return {
        "loss": ev.loss,
        "overall": {"accuracy": ev.accuracy, "correct": ev.correct, "total": ev.total, "split": ev.split},
        "per_class": per_class,
        **averages,
        "classes": ev.classes,
        "confusion_matrix": ev.confusion_matrix.tolist(),
        "most_confused": [{"true": t, "predicted": q, "count": n} for t, q, n in confused_pairs(ev)],
        "misclassified": [m._asdict() for m in mistakes(ev)],
        "provenance": ev.provenance,
    }


# Okabe-Ito colours, told apart with any colour vision; a wrong prediction is also framed dashed and says "wrong"
RIGHT, WRONG = "#0072B2", "#D55E00"


def confusion_figure(ev: Evaluation):
    """Counts and row-normalised shares (with a colour bar) side by side, drawn by scikit-learn's
    ConfusionMatrixDisplay on a matplotlib Figure (no pyplot, no backend: shows inline in Jupyter, saves anywhere)."""
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    cm = ev.confusion_matrix
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)  # each true class's row sums to 1
    n = len(ev.classes)
    fig = Figure(figsize=(2.4 * n + 4, 1.2 * n + 1.8), layout="constrained")
    panels = ((cm, "d", False, "counts"), (share, ".0%", True, "share of each true class (rows sum to 100 %)"))
    for ax, (values, fmt, bar, title) in zip(fig.subplots(1, 2), panels):
        shown = ConfusionMatrixDisplay(values, display_labels=ev.classes)
        shown.plot(ax=ax, cmap="Blues", values_format=fmt, colorbar=bar, xticks_rotation=45)
        shown.im_.set_clim(0, values.max() if values is cm else 1)
        ax.set(xlabel="predicted", ylabel="true")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{ev.label} accuracy {ev.accuracy:.1%} ({ev.correct}/{ev.total} images)")
    return fig


def samples_figure(ev: Evaluation, n_samples: int = 20, seed: int = 0):
    """Test images, the misclassified first (most confident first), then a seeded sample of the rest; each titled
    with its prediction, probability, true class and file name. None if no image can be read any more."""
    from matplotlib.figure import Figure

    from flowerfeat.data import BadImage, load_image

    wrong = _wrong_rows(ev)
    right = [int(i) for i in np.random.default_rng(seed).permutation(ev.total) if ev.y_true[i] == ev.y_pred[i]]
    shown = []
    for i in (wrong + right)[: max(n_samples, 0)]:
        try:
            shown.append((load_image(Path(ev.data_root) / ev.paths[i]), i))
        except (BadImage, OSError):
            continue  # images moved or deleted since extraction: the grid shows what is still there
    if not shown:
        return None
    cols = min(5, len(shown))
    rows = (len(shown) + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 3.6 * rows), layout="constrained")
    for k, (img, i) in enumerate(shown):
        ax = fig.add_subplot(rows, cols, k + 1, xticks=[], yticks=[])
        ax.imshow(np.asarray(img.resize((224, 224))))
        ok = ev.y_pred[i] == ev.y_true[i]
        pred, prob = ev.classes[ev.y_pred[i]], ev.probs[i, ev.y_pred[i]]
        verdict = "right" if ok else f"wrong: is {ev.classes[ev.y_true[i]]}"
        name = Path(ev.paths[i]).name
        ax.set_title(f"{pred} {prob:.0%} ({verdict})\n{name[:28]}", color=RIGHT if ok else WRONG, fontsize=9)
        for spine in ax.spines.values():
            spine.set(color=RIGHT if ok else WRONG, linewidth=1 if ok else 4, linestyle="-" if ok else "--")
    return fig


def write_figures(ev: Evaluation, out_dir: Path, n_samples: int = 20, seed: int = 0) -> list[Path]:
    """confusion_matrix.png and samples.png in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig, dpi in (
        ("confusion_matrix.png", confusion_figure(ev), 100),
        ("samples.png", samples_figure(ev, n_samples, seed), 80),
    ):
        if fig is not None:
            with warnings.catch_warnings():
                # class names in scripts the font lacks (CJK, emoji) are drawn as boxes; one warning per glyph per
                # draw would bury the report
                warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from", category=UserWarning)
                fig.savefig(out_dir / name, dpi=dpi)
            written.append(out_dir / name)
    return written
