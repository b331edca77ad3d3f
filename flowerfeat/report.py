"""Metrics, tables and figures for a head on a feature file: the textbook's lines, a confusion matrix, JSON, PNGs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowerfeat import store
from flowerfeat.train import Head, check_compatible, score


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

    @property
    def correct(self) -> int:
        return int((self.y_true == self.y_pred).sum())

    @property
    def total(self) -> int:
        return len(self.y_true)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    @property
    def per_class(self) -> dict[str, tuple[int, int]]:
        """class -> (correct, total)."""
        return {
            name: (int(((self.y_true == i) & (self.y_pred == i)).sum()), int((self.y_true == i).sum()))
            for i, name in enumerate(self.classes)
        }

    @property
    def confusion_matrix(self) -> np.ndarray:
        """(C, C) counts: rows are the true class, columns the predicted one."""
        return confusion(self)

    def to_dict(self) -> dict:
        return metrics(self)

    def __str__(self) -> str:
        return "\n".join(textbook_lines(self))

    def __repr__(self) -> str:
        return f"Evaluation(accuracy {self.accuracy:.1%} ({self.correct}/{self.total}), loss {self.loss:.4f})"


def evaluate(head: Head | str | Path, test: store.Features | str | Path | None = None) -> Evaluation:
    """Run a head over test features (centre crops only) after checking the two come from the same trunk;
    ``test`` defaults to the ``test.h5`` beside the features the head was fitted on.

    Example::

        ev = flowerfeat.evaluate(head, "data/features/fc7-imagenet/test.h5")
        print(ev)             # the textbook's per-class lines
        ev.confusion_matrix   # (C, C)
    """
    head = head if isinstance(head, Head) else Head.load(head)
    if test is None:
        test = Path(head.meta["config"]["features"]).with_name("test.h5")
    fs = test if isinstance(test, store.Features) else store.load_features(store.find_features(test, "test"))
    check_compatible(head, fs.meta, fs.path or "test features")
    keep = fs.views == 0
    x, y = fs.X[keep], fs.y[keep]
    loss, pred, probs = score(head.weight, head.bias, x, y)
    paths = [p for p, k in zip(fs.paths, keep) if k]
    return Evaluation(list(fs.classes), y, pred, probs, loss, paths, fs.meta.get("data_root", ""))


def textbook_lines(ev: Evaluation) -> list[str]:
    """The textbook's report, computed over every test row (its loop is only right for full batches)."""
    lines = [f"Test Loss: {ev.loss:.6f}", ""]
    for i, name in enumerate(ev.classes):
        total = int((ev.y_true == i).sum())
        correct = int(((ev.y_true == i) & (ev.y_pred == i)).sum())
        if total:
            lines.append(f"Test Accuracy of {name:>5}: {100 * correct // total:2d}% ({correct:2d}/{total:2d})")
        else:
            lines.append(f"Test Accuracy of {name:>5}: N/A (no test examples)")
    correct, total = int((ev.y_true == ev.y_pred).sum()), len(ev.y_true)
    lines += ["", f"Test Accuracy (Overall): {100 * correct // max(total, 1):2d}% ({correct:2d}/{total:2d})"]
    return lines


def confusion(ev: Evaluation) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(ev.y_true, ev.y_pred, labels=list(range(len(ev.classes))))


def confusion_lines(ev: Evaluation) -> list[str]:
    """Confusion matrix as text: rows are the true class, columns the predicted one."""
    cm = confusion(ev)
    w = max(max(len(c) for c in ev.classes), len(str(cm.max())) + 1, 6)
    head = " " * (w + 2) + "".join(f"{c[:w]:>{w + 1}}" for c in ev.classes)
    rows = [f"{c:>{w}}  " + "".join(f"{v:>{w + 1}d}" for v in r) for c, r in zip(ev.classes, cm)]
    return ["Confusion matrix (rows: true class, columns: predicted)", head, *rows]


def metrics(ev: Evaluation) -> dict:
    """Everything the report shows, machine-readable."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = list(range(len(ev.classes)))
    p, r, f, s = precision_recall_fscore_support(ev.y_true, ev.y_pred, labels=labels, zero_division=0)
    per_class = {}
    for i, name in enumerate(ev.classes):
        total = int((ev.y_true == i).sum())
        correct = int(((ev.y_true == i) & (ev.y_pred == i)).sum())
        per_class[name] = {
            "accuracy": correct / total if total else None,
            "correct": correct,
            "total": total,
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(s[i]),
        }
    correct = int((ev.y_true == ev.y_pred).sum())
    return {
        "loss": ev.loss,
        "overall": {"accuracy": correct / max(len(ev.y_true), 1), "correct": correct, "total": len(ev.y_true)},
        "per_class": per_class,
        "classes": ev.classes,
        "confusion_matrix": confusion(ev).tolist(),
    }


def confusion_figure(ev: Evaluation):
    """The confusion matrix as a matplotlib Figure (no pyplot, no backend: shows inline in Jupyter, saves anywhere)."""
    from matplotlib.figure import Figure

    cm = confusion(ev)
    fig = Figure(figsize=(1.2 * len(ev.classes) + 2, 1.2 * len(ev.classes) + 1.5), layout="tight")
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(ev.classes)), ev.classes, rotation=45, ha="right")
    ax.set_yticks(range(len(ev.classes)), ev.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            dark = cm[i, j] > cm.max() / 2
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if dark else "black")
    ax.set_title(f"Test accuracy {ev.accuracy:.1%} ({ev.total} images)")
    return fig


def samples_figure(ev: Evaluation, n_samples: int = 20, seed: int = 0):
    """Test images with their predicted (true) label, green right / red wrong, as a Figure; None if none of the
    images can be read any more."""
    from matplotlib.figure import Figure

    from flowerfeat.data import BadImage, load_image

    rng = np.random.default_rng(seed)
    shown = []
    for i in rng.permutation(len(ev.paths))[:n_samples]:
        try:
            shown.append((load_image(Path(ev.data_root) / ev.paths[i]), i))
        except (BadImage, OSError):
            continue  # images moved or deleted since extraction: the grid shows what is still there
    if not shown:
        return None
    cols = min(10, len(shown))
    rows = (len(shown) + cols - 1) // cols
    fig = Figure(figsize=(2.5 * cols, 2.8 * rows), layout="tight")
    for k, (img, i) in enumerate(shown):
        ax = fig.add_subplot(rows, cols, k + 1, xticks=[], yticks=[])
        ax.imshow(np.asarray(img.resize((224, 224))))
        ok = ev.y_pred[i] == ev.y_true[i]
        ax.set_title(f"{ev.classes[ev.y_pred[i]]} ({ev.classes[ev.y_true[i]]})", color="green" if ok else "red")
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
            fig.savefig(out_dir / name, dpi=dpi)
            written.append(out_dir / name)
    return written
