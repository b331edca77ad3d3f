"""Use a trained head: classify new images with the trunk that made its features (files, PIL images, arrays)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from flowerfeat import runtime, store
from flowerfeat.backbones import Backbone, get_backbone
from flowerfeat.config import PRECISIONS, batch_size_for
from flowerfeat.data import IMAGE_EXTENSIONS, BadImage, load_image, to_rgb
from flowerfeat.errors import FlowerfeatError
from flowerfeat.heads import Head
from flowerfeat.weights import WeightsInfo, sha256_file


@dataclass(frozen=True)
class TrunkSpec:
    """The trunk a head's features came from: the model, its cut, the weights found for it."""

    backbone: Backbone
    cut: str
    weights: WeightsInfo

    def build(self) -> torch.nn.Module:
        return self.backbone.build(self.weights, self.cut)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.backbone.preprocessing(self.weights).input_shape


def weights_for(ck: Head, weights: str | None) -> TrunkSpec:
    """The trunk the head's features came from: its model and cut from the head's record, ``weights`` when given,
    else found from the record (the model's published ones for imagenet; a file at its recorded path with its
    recorded sha256). Other weights or preprocessing are refused with one line, before anything is loaded."""
    record = ck.meta["features"]
    backbone = get_backbone(record["model"])
    want = record["weights"]
    if weights is None:
        weights = _remembered_weights(record)
    info = backbone.resolve_weights(weights)
    moved = info.kind == "file" and info.sha256 and info.sha256 == record.get("weights_sha256")  # renamed: same bytes
    if info.identity != want and not moved:
        raise FlowerfeatError(
            f"--weights {weights} is {info.identity[:70]}, but the head was trained on features from {want[:70]}; "
            "pass the same weights"
        )
    if record["preprocessing"] != backbone.preprocessing(info).to_dict():
        raise FlowerfeatError("the head was trained on features with other preprocessing; re-extract and refit it")
    return TrunkSpec(backbone, record["layer"], info)


def _remembered_weights(record: dict) -> str:
    """The --weights value that reproduces the head's trunk, from its record; a one-line error when the file moved."""
    want = record["weights"]
    if want.startswith(("torchvision:", "timm:")):
        return "imagenet"
    if want.startswith("none:"):
        return "none"
    name, sha, path = want.split(":")[1], record.get("weights_sha256") or "", record.get("weights_path") or ""
    if path and Path(path).is_file():
        if sha256_file(Path(path)) == sha:
            return path
        where = f"; {path} has changed since"
    else:
        where = f", no longer at {path}" if path else ""
    raise FlowerfeatError(
        f"the head's features came from weights {name} (sha256 {sha or 'unknown'}){where}; "
        "pass --weights PATH to that file"
    )


def int8_model(record: dict) -> Path:
    """The very int8 trunk file the head's features were made with (kept beside them), checked by its sha256."""
    kept = record.get("quantized_model") or {}
    path = Path(kept.get("path", ""))
    if not path.is_file() or sha256_file(path) != kept.get("sha256"):
        raise FlowerfeatError(
            f"{path}: the int8 trunk the head's features were made with is gone or changed; extract the features "
            "again with --precision int8 and refit, or pass --precision fp32"
        )
    return path


def _image_files(p: Path) -> list[Path]:
    """A file as given, a folder's image files searched recursively (sorted); a missing path refused."""
    if p.is_dir():
        return sorted(
            f
            for f in p.rglob("*")
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
        )
    if p.is_file():
        return [p]
    raise FlowerfeatError(f"{p}: no such file or folder; pass image files or folders of images")


@dataclass
class Prediction:
    """One image's result: its best class and probability, the top-k, or why it was skipped.

    Example::

        p = classifier.predict("rose.jpg", top_k=2)[0]
        p.label, p.probability, p.top  # 'roses', 0.91, [('roses', 0.91), ('tulips', 0.06)]
    """

    path: str  # the file, or "<image k>" for the k-th image passed in memory
    top: list[tuple[str, float]]  # (class, probability), best first; empty when skipped
    error: str = ""

    @property
    def label(self) -> str | None:
        return self.top[0][0] if self.top else None

    @property
    def probability(self) -> float | None:
        return self.top[0][1] if self.top else None


class Classifier:
    """The trunk that made a head's features plus the head: classifies images end to end.

    Example::

        clf = flowerfeat.Classifier.load("data/runs/vgg16-fc7-imagenet/head.pt")
        for p in clf.predict(["rose.jpg", "daisy.jpg"], top_k=2):
            print(p.path, p.label, p.probability)
    """

    def __init__(self, head: Head, spec: TrunkSpec, device: torch.device, engine: str, precision: str):
        self.head, self.spec, self.device, self.engine, self.precision = head, spec, device, engine, precision
        self._trunk: torch.nn.Module | None = None  # built on the first predict, after the inputs are checked
        self._transform = spec.backbone.preprocessing(spec.weights).transform()  # as at extraction
        self._head = head.module.to(device).eval()

    @classmethod
    def load(
        cls,
        head: str | Path | Head,
        weights: str | None = None,
        device: str = "auto",
        engine: str = "auto",
        precision: str = "auto",
    ) -> Classifier:
        """The head at ``head`` (or a loaded Head) and the trunk weights its features came from; ``weights`` names
        them when they are not where the head's record says. Refuses other weights, layer or preprocessing.
        ``engine`` and ``precision`` auto run the trunk as the head's features were made (the engine where it is
        installed); ``precision="fp32"`` computes as exported models do."""
        head = head if isinstance(head, Head) else Head.load(head)
        dev = runtime.resolve_device(device)
        record = head.meta["features"]
        precision = record["precision"] if precision == "auto" else precision
        if precision not in PRECISIONS:
            raise FlowerfeatError(f"unknown precision (--precision) {precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if precision == "int8" and record["precision"] != "int8":
            raise FlowerfeatError("--precision int8 runs the int8 trunk an int8 extraction made; this head's is not")
        engine = runtime.resolve_engine(engine, dev, precision, previous=store.engine_of(record))
        return cls(head, weights_for(head, weights), dev, engine, precision)

    @property
    def classes(self) -> list[str]:
        return self.head.classes

    def trunk(self) -> torch.nn.Module:
        """The frozen trunk on this classifier's device, channels-last; built once."""
        if self._trunk is None:
            if self.precision == "int8":
                self._trunk = runtime.OnnxModel(int8_model(self.head.meta["features"]))
            else:
                trunk = runtime.on_engine(self.spec.build(), self.engine, self.spec.input_shape)
                self._trunk = trunk.to(self.device).to(memory_format=torch.channels_last)
        return self._trunk

    def predict(self, images, top_k: int = 1, batch_size: int = 0) -> list[Prediction]:
        """Classify image files, folders of them, PIL images or (H, W, 3) uint8 arrays (one or a list); unreadable
        ones come back with ``error`` set. Results follow the input order (a folder's files sorted). ``batch_size``
        0 is the device's auto size, as for extraction."""
        if top_k < 1:
            raise FlowerfeatError(f"--top-k must be >= 1, got {top_k}")
        if batch_size < 0:
            raise FlowerfeatError(f"--batch-size must be >= 0, got {batch_size}")
        batch_size = batch_size_for(self.device.type, batch_size)
        inputs = _expand(images)
        k = min(top_k, len(self.classes))
        results: list[Prediction] = []
        for start in range(0, len(inputs), batch_size):
            results += self._batch(inputs[start : start + batch_size], k)
        return results

    def _batch(self, inputs: list[tuple[str, object]], k: int) -> list[Prediction]:
        preds, tensors = [], []
        for name, image in inputs:
            preds.append(Prediction(name, []))
            try:
                tensors.append(self._transform(_as_rgb(image)))
            except BadImage as e:
                preds[-1].error = str(e)
        good = [p for p in preds if not p.error]
        if good:
            x = torch.stack(tensors).to(self.device).contiguous(memory_format=torch.channels_last)
            feats = runtime.trunk_rows(self.trunk(), x, self.precision)  # (B, D)
            with torch.no_grad():
                probs = self._head(feats).softmax(1).cpu()  # (B, C)
            top_p, top_i = probs.topk(k, dim=1)  # (B, k)
            for pred, ps, idx in zip(good, top_p.tolist(), top_i.tolist()):
                pred.top = [(self.classes[i], p) for i, p in zip(idx, ps)]
        return preds


def _expand(images) -> list[tuple[str, object]]:
    """(name, image) pairs: folders become their image files (sorted); missing paths are refused before any work."""
    if isinstance(images, (str, Path, np.ndarray, Image.Image)):
        images = [images]
    out: list[tuple[str, object]] = []
    for k, image in enumerate(images):
        if isinstance(image, (str, Path)):
            out += [(str(f), f) for f in _image_files(Path(image))]
        else:
            out.append((f"<image {k}>", image))
    if not out:
        raise FlowerfeatError(f"{', '.join(map(str, images))}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
    return out


def _as_rgb(image) -> Image.Image:
    """A file, PIL image or uint8 array as an RGB PIL image, EXIF orientation applied (as for files)."""
    if isinstance(image, Path):
        return load_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise BadImage(f"array of shape {image.shape} and dtype {image.dtype}; pass (H, W, 3) uint8 RGB")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise BadImage(f"a {type(image).__name__}; pass a file path, a PIL image or an (H, W, 3) uint8 array")
    return to_rgb(ImageOps.exif_transpose(image))


def prepare_output(path: Path) -> None:
    """Check a predictions file's suffix and make its folder, before any image is classified (a bad path then
    costs nothing)."""
    if path.suffix.lower() not in (".csv", ".json"):
        raise FlowerfeatError(f"{path}: --output must end in .csv or .json")
    path.parent.mkdir(parents=True, exist_ok=True)


def write_predictions(preds: list[Prediction], path: Path) -> None:
    """CSV (path, rank, class, probability, error) or JSON, by the suffix prepare_output checked."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        rows = [
            {"path": p.path, "top": [{"class": c, "probability": q} for c, q in p.top], "error": p.error or None}
            for p in preds
        ]
        path.write_text(json.dumps(rows, indent=2) + "\n")
        return
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "rank", "class", "probability", "error"])
        for p in preds:
            if p.error:
                w.writerow([p.path, "", "", "", p.error])
            for rank, (c, q) in enumerate(p.top, 1):
                w.writerow([p.path, rank, c, f"{q:.6f}", ""])
