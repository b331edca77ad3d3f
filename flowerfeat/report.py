"""Metrics, tables and figures for a head on a feature file: the textbook's lines, a confusion matrix, JSON, PNGs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowerfeat import store
from flowerfeat.train import Checkpoint, check_compatible, evaluate


@dataclass
class Evaluation:
    classes: list[str]
    y_true: np.ndarray  # (N,)
    y_pred: np.ndarray  # (N,)
    probs: np.ndarray  # (N, C)
    loss: float
    paths: list[str]
    data_root: str


def evaluate_file(ck: Checkpoint, features_path: Path, head_path: Path) -> Evaluation:
    """Run the head over a feature file (centre crops only) after checking the two belong together."""
    fs = store.load_features(features_path)
    check_compatible(ck, fs.meta, features_path, head_path)
    keep = fs.views == 0
    x, y = fs.features[keep], fs.labels[keep]
    loss, pred, probs = evaluate(ck.weight, ck.bias, x, y)
    paths = [p for p, k in zip(fs.paths, keep) if k]
    return Evaluation(list(fs.meta["classes"]), y, pred, probs, loss, paths, fs.meta.get("data_root", ""))


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


def write_figures(ev: Evaluation, out_dir: Path, n_samples: int = 20, seed: int = 0) -> list[Path]:
    """confusion_matrix.png and samples.png (test images, predicted (true) label, green right / red wrong)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; chosen per call, no import-time global
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    cm = confusion(ev)
    fig, ax = plt.subplots(figsize=(1.2 * len(ev.classes) + 2, 1.2 * len(ev.classes) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(ev.classes)), ev.classes, rotation=45, ha="right")
    ax.set_yticks(range(len(ev.classes)), ev.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black"
            )
    acc = (ev.y_true == ev.y_pred).mean() if len(ev.y_true) else 0.0
    ax.set_title(f"Test accuracy {acc:.1%} ({len(ev.y_true)} images)")
    fig.tight_layout()
    written.append(out_dir / "confusion_matrix.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    from flowerfeat.data import BadImage, load_image

    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(ev.paths))[:n_samples]
    shown = []
    for i in pick:
        try:
            shown.append((load_image(Path(ev.data_root) / ev.paths[i]), i))
        except (BadImage, OSError):
            continue  # images moved or deleted since extraction: the grid shows what is still there
    if shown:
        cols = min(10, len(shown))
        rows = (len(shown) + cols - 1) // cols
        fig = plt.figure(figsize=(2.5 * cols, 2.8 * rows))
        for k, (img, i) in enumerate(shown):
            ax = fig.add_subplot(rows, cols, k + 1, xticks=[], yticks=[])
            ax.imshow(np.asarray(img.resize((224, 224))))
            ok = ev.y_pred[i] == ev.y_true[i]
            ax.set_title(f"{ev.classes[ev.y_pred[i]]} ({ev.classes[ev.y_true[i]]})", color="green" if ok else "red")
        fig.tight_layout()
        written.append(out_dir / "samples.png")
        fig.savefig(written[-1], dpi=80)
        plt.close(fig)
    return written
