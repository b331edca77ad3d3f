"""The head: the new last layer (Dropout + Linear) as one module, or the trained top of the trunk with it (a cut below
the top: ``fit-head --train-top``); and its self-sufficient checkpoint."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flowerfeat import store
from flowerfeat.errors import FlowerfeatError

# 2: the model is recorded with the features (heads of version 1 predate the choice of model)
CHECKPOINT_VERSION = 2


class Rows2Logits(nn.Module):
    """What every head is: (N, D) cached rows -> (N, C) logits, also from numpy."""

    chunk = 4096  # rows scored at once: flat memory for any N

    def logits(self, x) -> np.ndarray:
        """(N, C) logits of (N, D) features, as numpy, computed on the module's device."""
        device = next(self.parameters()).device
        with torch.no_grad():
            parts = [self(torch.from_numpy(np.ascontiguousarray(x[s : s + self.chunk], dtype=np.float32)).to(device))
                     for s in range(0, max(len(x), 1), self.chunk)]  # fmt: skip
        return torch.cat(parts).cpu().numpy()


class LinearHead(Rows2Logits):
    """Dropout + Linear: the replacement for the model's classifier (for VGG16 at fc7, ``classifier[5:]``, the
    Linear being ``classifier[6]``). Training, scoring, predict, export, report and bench all call this module."""

    def __init__(self, dim: int, n_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(dim, n_classes)

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor, dropout: float = 0.0) -> LinearHead:
        """A head in eval mode holding ``weight`` (C, D) and ``bias`` (C,)."""
        head = cls(weight.shape[1], weight.shape[0], dropout)
        with torch.no_grad():
            head.linear.weight.copy_(weight)
            head.linear.bias.copy_(bias)
        return head.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(x))  # (B, C) logits


class TopHead(Rows2Logits):
    """The top of the trunk above a cut, trained, then Dropout + Linear: cached activation rows (B, C*H*W) -> the
    activations (B, C, H, W) -> the top's pooled rows (B, top_dim) -> (B, classes) logits."""

    chunk = 128  # the top convolves: a smaller chunk keeps scoring in flat memory

    def __init__(self, top: nn.Module, shape: tuple[int, ...], top_dim: int, n_classes: int, dropout: float = 0.0):
        super().__init__()
        self.shape = tuple(shape)
        self.top = top
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(top_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(self.top(x.view(-1, *self.shape))))


def score(head: LinearHead, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(mean cross-entropy, predictions, probabilities) of the head (in eval mode) on features ``x``."""
    logits = torch.from_numpy(head.eval().logits(x))  # (N, C)
    loss = (
        nn.functional.cross_entropy(logits, torch.from_numpy(y).long(), reduction="mean").item()
        if len(y)
        else float("nan")
    )
    probs = logits.softmax(1)
    return loss, probs.argmax(1).numpy(), probs.numpy()


@dataclass
class Head:
    """A trained head with everything needed to use it again: the trunk's record (model, layer, weights,
    preprocessing, classes), the fit's configuration, its metrics and history.

    Example::

        head = flowerfeat.Head.load("data/runs/vgg16-fc7-imagenet/head.pt")
        head.predict(te.X)        # (N,) class indices; head.classes names them
        head.predict_proba(te.X)  # (N, C) probabilities
    """

    module: Rows2Logits  # a LinearHead, or a TopHead (kind "top"); in eval mode
    meta: dict  # checkpoint_version, features (the trunk's record), config, metrics, history
    path: Path | None = None  # the checkpoint file, once saved or loaded

    @classmethod
    def from_fit(cls, result, feature_meta: dict, cfg) -> Head:
        """The head of a ``train.FitResult`` on features described by ``feature_meta``, fitted with ``cfg``."""
        meta = {
            "checkpoint_version": CHECKPOINT_VERSION,
            "kind": "top" if result.module is not None else "linear",
            "features": {k: feature_meta.get(k) for k in store.HEAD_FIELDS},
            "config": cfg.settled().to_dict(),  # the settings as used
            "metrics": result.metrics,
            "history": result.history,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if result.module is not None:
            return cls(result.module.eval().requires_grad_(False), meta)
        return cls(LinearHead.of(result.weight, result.bias, result.metrics.get("dropout", 0.0)), meta)

    @property
    def kind(self) -> str:
        """``linear``: the new last layer alone; ``top``: the trained top of the trunk and the new last layer."""
        return self.meta.get("kind", "linear")

    @property
    def weight(self) -> torch.Tensor:
        return self.module.linear.weight  # (C, D)

    @property
    def bias(self) -> torch.Tensor:
        return self.module.linear.bias  # (C,)

    @property
    def classes(self) -> list[str]:
        return list(self.meta["features"]["classes"])

    @property
    def layer(self) -> str:
        return self.meta["features"]["layer"]

    @property
    def model(self) -> str:
        return self.meta["features"]["model"]

    @property
    def metrics(self) -> dict:
        return self.meta["metrics"]

    def logits(self, X) -> np.ndarray:
        """(N, C) logits for features ``X`` ((N, D) array, or loaded Features)."""
        return self.module.eval().logits(getattr(X, "X", X))

    def predict_proba(self, X) -> np.ndarray:
        """(N, C) class probabilities (softmax of the logits)."""
        return torch.from_numpy(self.logits(X)).softmax(1).numpy()

    def predict(self, X) -> np.ndarray:
        """(N,) predicted class indices (``self.classes[i]`` names them)."""
        return self.logits(X).argmax(1)

    @property
    def recipe(self):
        """The recipe of the trunk whose rows the head takes (recipe.Recipe)."""
        from flowerfeat.recipe import Recipe

        return Recipe.from_attrs(self.meta["features"])

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint atomically: tensors and one JSON string, loadable with
        ``torch.load(path, weights_only=True)`` (no code runs on load)."""
        tensors = self.module.state_dict() if self.kind == "top" else {"weight": self.weight, "bias": self.bias}
        self.path = store.save_checkpoint(Path(path), tensors, self.meta)
        return self.path

    @classmethod
    def load(cls, path: str | Path) -> Head:
        """Read a checkpoint written by ``save`` (or ``flowerfeat fit-head``); one-line FlowerfeatError otherwise."""
        path = Path(path)
        tensors, meta = store.load_checkpoint(path)
        version = meta.get("checkpoint_version")
        if isinstance(version, int) and version < CHECKPOINT_VERSION:
            raise FlowerfeatError(
                f"{path}: a head from an earlier flowerfeat (checkpoint {version}); extract the features again with "
                "`flowerfeat features` and refit with `flowerfeat fit-head`"
            )
        refusal = FlowerfeatError(
            f"{path}: not a flowerfeat head checkpoint (corrupt, truncated or foreign); rerun `flowerfeat fit-head`"
        )
        if version != CHECKPOINT_VERSION:
            raise refusal
        try:
            module = _rebuilt(tensors, meta)
        except (KeyError, TypeError, ValueError, RuntimeError):  # tensors that are not the record's
            raise refusal from None
        return cls(module, meta, path)

    def source_line(self) -> str:
        """Which head answers, in one line: its file, model and cut, classes, data set and when it was fitted."""
        classes = self.classes if len(self.classes) <= 6 else [*self.classes[:5], "..."]
        when = str(self.meta.get("created", "?"))[:16].replace("T", " ")
        data = self.meta["features"].get("data_root") or "unknown"
        return (
            f"head {self.path or '(in memory)'}: {self.model} {self.layer}, {len(self.classes)} classes "
            f"({', '.join(classes)}), data set {data}, fitted {when}"
        )

    def __repr__(self) -> str:
        return (
            f"Head({self.model} {self.layer}, {self.weight.shape[1]}-d -> {len(self.classes)} classes {self.classes})"
        )


def check_compatible(ck: Head, feature_meta: dict, features_path) -> None:
    """Refuse a head and a feature file that were not made by the same trunk, layer, preprocessing and classes."""
    own = ck.meta["features"]
    diffs = [k for k in store.CHECKED_FIELDS if own.get(k) != feature_meta.get(k)]
    if not diffs and own["model_key"] != feature_meta["model_key"]:
        diffs = ["model_key"]
    if diffs:
        what = ", ".join(f"{k} {_shown(own.get(k))} vs {_shown(feature_meta.get(k))}" for k in diffs[:3])
        raise FlowerfeatError(
            f"{features_path}: features do not match head {ck.path or ''} ({what}); extract them with the head's "
            "settings or refit the head on features from the same run"
        )


def _rebuilt(tensors: dict, meta: dict) -> Rows2Logits:
    """The head module a checkpoint holds: a LinearHead from its weight and bias, or a TopHead: the top's modules
    made by the model's family (their values then loaded from the checkpoint)."""
    dropout = float(meta["metrics"].get("dropout", 0.0))
    n_classes, dim = len(meta["features"]["classes"]), meta["features"]["feature_dim"]
    if meta.get("kind", "linear") == "linear":
        if tuple(tensors["weight"].shape) != (n_classes, dim):
            raise ValueError("weight of another shape")
        return LinearHead.of(tensors["weight"], tensors["bias"], dropout)
    from flowerfeat.recipe import Recipe
    from flowerfeat.weights import WeightsInfo

    recipe = Recipe.from_attrs(meta["features"])
    cut = recipe.backbone.cut(recipe.layer)
    _, top = recipe.backbone.split(WeightsInfo("none", "none"), cut.name)  # the modules; values from the checkpoint
    module = TopHead(top, cut.shape, cut.top_dim, n_classes, dropout)
    module.load_state_dict(tensors)
    return module.eval().requires_grad_(False)


def _shown(value, limit: int = 60) -> str:
    """A recorded value for a one-line message: a list by whole items (``['a', 'b', ... +3 more]``), other values
    cut at ``limit`` characters with an ellipsis, never mid-item."""
    if isinstance(value, (list, tuple)):
        shown, items = [], [repr(v) for v in value]
        for item in items:
            if sum(len(s) + 2 for s in shown) + len(item) > limit and shown:
                return "[" + ", ".join(shown) + f", ... +{len(items) - len(shown)} more]"
            shown.append(item)
        return "[" + ", ".join(shown) + "]"
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def head_name(cfg, fingerprint: str) -> str:
    """A head's default name: its settings in words and a digest of all of them and of the training features'
    fingerprint (``adam-2ep-seed0-1a2b3c4d``, ``lbfgs-C0.1-seed0-...``), so another fit never takes an existing name
    and the same fit on the same features always gets the same one."""
    cfg = cfg.settled()
    where = ("features", "out", "name", "replace_head", "device")  # where it is written or trained, not how
    settings = {k: v for k, v in cfg.to_dict().items() if k not in where}
    digest = hashlib.sha256(json.dumps([settings, fingerprint], sort_keys=True).encode()).hexdigest()[:8]
    words = f"lbfgs-C{cfg.C:g}" if cfg.solver == "lbfgs" else f"{cfg.optimizer}-{cfg.epochs}ep"
    words = (f"top-{cfg.epochs}ep" if cfg.epochs else "top") if cfg.train_top else words  # None: they follow the data
    return f"{words}-seed{cfg.seed}-{digest}"


def destination(cfg) -> Path:
    """Where fit-head saves the head ``cfg`` describes: --out, or --name (or its default name) in ``heads/`` beside
    the training features. An existing head at a path asked for is refused unless --replace; under the default name
    it is the same fit on the same features (refitting it gives the very same head)."""
    asked = cfg.out or (store.head_path(cfg.features, cfg.name) if cfg.name else None)
    if asked is not None and Path(asked).exists() and not cfg.replace_head:
        raise FlowerfeatError(
            f"{asked}: a head is already there; pass --replace to replace it, or another "
            f"--{'out' if cfg.out else 'name'}"
        )
    fingerprint = store.read_meta(cfg.features)["fingerprint"]
    return Path(asked) if asked is not None else store.head_path(cfg.features, head_name(cfg, fingerprint))
