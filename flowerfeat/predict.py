"""Use a trained head: classify new images with the very trunk its features came from, decoded as they were (files,
PIL images, arrays)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from flowerfeat import runtime
from flowerfeat.config import batch_size_for
from flowerfeat.data import IMAGE_EXTENSIONS, BadImage, files_split, to_rgb
from flowerfeat.errors import FlowerfeatError
from flowerfeat.heads import Head
from flowerfeat.recipe import Recipe, Trunk, build, runs_from_its_engine_file

# decoder recorded -> the reader's mode that decodes so (extraction/reader.py)
DECODE_MODES = {"pil": "cpu", "pil-draft": "draft", "libjpeg": "hybrid", "nvjpeg": "gpu"}


def head_recipe(head: Head, weights: str | None = None) -> Recipe:
    """The recipe of the trunk the head's features came from, with its weights found (``Recipe.found``)."""
    return head.recipe.found(weights)


def run_here(recipe: Recipe, device: torch.device, engine: str | None, precision: str | None):
    """(recipe, decode mode, notes): the head's recipe as it runs on ``device``, with ``precision`` and ``engine``
    when asked (None: as the features were made), and one line for each way it cannot be as they were made."""
    notes = []
    if precision is not None and precision != recipe.precision:
        if precision == "int8":
            raise FlowerfeatError("--precision int8 runs the int8 trunk an int8 extraction made; this head's is not")
        recipe = recipe.replace(precision=precision, quantization=None, artefact=None)
    engine = runtime.resolve_engine(engine or "auto", device, recipe.precision, previous=recipe.engine)
    recipe = recipe.replace(engine=engine)
    mode = DECODE_MODES.get(recipe.decoder, "cpu")
    if mode == "gpu" and device.type != "cuda":
        mode = "hybrid"
        notes.append("note: the head's features were decoded by nvjpeg on a GPU; here libjpeg decodes (pixels differ "
                     "slightly: nvjpeg replicates chroma samples where libjpeg interpolates)")  # fmt: skip
    return recipe, mode, notes


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

    def __init__(self, head: Head, recipe: Recipe, device: torch.device, mode: str = "cpu", notes=()):
        self.head, self.recipe, self.device, self.mode = head, recipe, device, mode
        self.notes = list(notes)  # where this run cannot be as the features were made, one line each
        self._trunk: Trunk | None = None  # built on the first predict, after the inputs are checked
        self._transform = recipe.preprocessing.transform()  # as at extraction
        self._head = head.module.to(device).eval()

    @classmethod
    def load(
        cls,
        head: str | Path | Head,
        weights: str | None = None,
        device: str = "auto",
        engine: str | None = None,
        precision: str | None = None,
    ) -> Classifier:
        """The head at ``head`` (or a loaded Head) and the trunk its features came from; ``weights`` names the
        weights file when it is not where the head's record says. Refuses other weights, layer or preprocessing.
        ``engine`` and ``precision`` (None: as the head's features were made) change how the trunk runs;
        ``precision="fp32"`` computes as exported models do."""
        head = head if isinstance(head, Head) else Head.load(head)
        dev = runtime.resolve_device(device)
        recipe, mode, notes = run_here(head.recipe, dev, engine, precision)
        if weights is not None or not runs_from_its_engine_file(recipe):  # else no weights to find (nor timm to import)
            recipe = recipe.replace(weights=head_recipe(head, weights).weights)
        return cls(head, recipe, dev, mode, notes)

    @property
    def classes(self) -> list[str]:
        return self.head.classes

    @property
    def precision(self) -> str:
        return self.recipe.precision

    def trunk(self) -> Trunk:
        """The frozen trunk on this classifier's device; built once."""
        if self._trunk is None:
            self._trunk = build(self.recipe, self.device)
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
        preds = [Prediction(name, []) for name, _ in inputs]
        k = min(top_k, len(self.classes))
        files = [i for i, (_, image) in enumerate(inputs) if isinstance(image, Path)]
        if files:
            self._files([inputs[i][1] for i in files], [preds[i] for i in files], batch_size, k)
        memory = [i for i, (_, image) in enumerate(inputs) if not isinstance(image, Path)]
        for start in range(0, len(memory), batch_size):
            part = memory[start : start + batch_size]
            self._images([inputs[i][1] for i in part], [preds[i] for i in part], k)
        return preds

    def _files(self, paths: list[Path], preds: list[Prediction], batch_size: int, k: int) -> None:
        """Files through the extraction's own reader, so they are decoded as the features were."""
        from flowerfeat.extraction.job import CPU_READERS
        from flowerfeat.extraction.reader import make_loader

        batches = [list(range(s, min(s + batch_size, len(paths)))) for s in range(0, len(paths), batch_size)]
        # beside a CPU trunk, reader threads as for extraction; one batch, or a GPU, reads in this thread
        readers = CPU_READERS if self.device.type == "cpu" and len(batches) > 1 else 0
        loader = make_loader(files_split(paths), 0, 0, batches, preprocessing=self.recipe.preprocessing,
                             mode=self.mode, device=self.device, workers=readers)  # fmt: skip
        for x, ids, skipped in loader:
            for unit, reason in skipped:
                preds[unit].error = reason
            if x is not None:
                self._top(x, [preds[u] for u in ids], k)

    def _images(self, images: list, preds: list[Prediction], k: int) -> None:
        """Images in memory (PIL or arrays) through the weights' transform."""
        tensors, good = [], []
        for image, pred in zip(images, preds):
            try:
                tensors.append(self._transform(_as_rgb(image)))
                good.append(pred)
            except BadImage as e:
                pred.error = str(e)
        if good:
            self._top(torch.stack(tensors), good, k)

    def _top(self, x: torch.Tensor, preds: list[Prediction], k: int) -> None:
        feats = self.trunk().rows(x.to(self.device))  # (B, D)
        with torch.no_grad():
            probs = self._head(feats).softmax(1).cpu()  # (B, C)
        top_p, top_i = probs.topk(k, dim=1)  # (B, k)
        for pred, ps, idx in zip(preds, top_p.tolist(), top_i.tolist()):
            pred.top = [(self.classes[i], p) for i, p in zip(idx, ps)]


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
    """A PIL image or uint8 array as an RGB PIL image, EXIF orientation applied (as for files)."""
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
