"""Use a trained head: classify new images (trunk + head), or export the textbook's full VGG16 state dict."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from flowerfeat import backbone, store
from flowerfeat.data import IMAGE_EXTENSIONS, BadImage, load_image
from flowerfeat.errors import FlowerfeatError
from flowerfeat.train import Checkpoint


def weights_for(ck: Checkpoint, weights: str | None) -> tuple[backbone.WeightsInfo, str]:
    """The trunk weights the head was trained on; a --weights that differs is refused with one line."""
    want = ck.meta["features"]["weights"]
    if weights is None:
        if want.startswith("torchvision:"):
            weights = "imagenet"
        elif want.startswith("none:"):
            weights = "none"
        else:
            raise FlowerfeatError(f"the head was trained on features from {want}; pass --weights PATH to that file")
    info = backbone.resolve_weights(weights)
    if info.identity != want:
        raise FlowerfeatError(
            f"--weights {weights} is {info.identity[:70]}, but the head was trained on features from {want[:70]}; "
            "pass the same weights"
        )
    if ck.meta["features"]["preprocessing"] != backbone.preprocessing():
        raise FlowerfeatError("the head was trained on features with other preprocessing; re-extract and refit it")
    return info, weights


def load_trunk(ck: Checkpoint, trunk_weights: tuple[backbone.WeightsInfo, str], device: torch.device):
    """The frozen trunk that made the head's features (``trunk_weights`` from ``weights_for``), on ``device``,
    channels-last."""
    info, weights_arg = trunk_weights
    trunk = backbone.build_trunk(info, ck.meta["features"]["layer"], weights_arg).to(device)
    return trunk.to(memory_format=torch.channels_last)


def list_images(paths: list[Path]) -> list[Path]:
    """Files as given, folders searched recursively for image files (sorted); missing paths refused."""
    out = []
    for p in paths:
        if p.is_dir():
            out += sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
            )
        elif p.is_file():
            out.append(p)
        else:
            raise FlowerfeatError(f"{p}: no such file or folder; pass image files or folders of images")
    if not out:
        raise FlowerfeatError(f"{', '.join(map(str, paths))}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
    return out


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class, probability), best first; empty when skipped
    error: str = ""


def predict(
    ck: Checkpoint,
    images: list[Path],
    trunk: torch.nn.Module,
    top_k: int = 1,
    batch_size: int = 16,
    device: torch.device = torch.device("cpu"),
) -> list[Prediction]:
    """Run trunk + head over image files; unreadable ones come back with ``error`` set."""
    precision = ck.meta["features"]["precision"]
    transform = backbone.build_transform()
    classes = ck.classes
    k = max(1, min(top_k, len(classes)))
    weight, bias = ck.weight.to(device), ck.bias.to(device)
    results: list[Prediction] = []
    for start in range(0, len(images), batch_size):
        batch, tensors = [], []
        for p in images[start : start + batch_size]:
            try:
                tensors.append(transform(load_image(p)))
                batch.append(Prediction(str(p), []))
            except BadImage as e:
                results.append(Prediction(str(p), [], str(e)))
        if not tensors:
            continue
        x = torch.stack(tensors).to(device).contiguous(memory_format=torch.channels_last)
        feats = backbone.trunk_rows(trunk, x, precision)  # (B, D)
        probs = (feats @ weight.T + bias).softmax(1).cpu()  # (B, C)
        top_p, top_i = probs.topk(k, dim=1)
        for pred, ps, idx in zip(batch, top_p.tolist(), top_i.tolist()):
            pred.top = [(classes[i], p) for i, p in zip(idx, ps)]
        results.extend(batch)
    order = {str(p): i for i, p in enumerate(images)}
    return sorted(results, key=lambda r: order[r.path])


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


def export(ck: Checkpoint, out: Path, info: backbone.WeightsInfo, weights_arg: str) -> Path:
    """Write torchvision VGG16's full state dict with the head in classifier[6], plus a JSON of classes and preprocessing.

    Loads with ``torchvision.models.vgg16(num_classes=C).load_state_dict(torch.load(out))`` and no flowerfeat.
    """
    layer = ck.meta["features"]["layer"]
    if layer != "fc7":
        raise FlowerfeatError(
            f"the head was trained on {layer} features; only an fc7 head is VGG16's classifier[6] "
            "(re-extract with --layer fc7 and refit to export)"
        )
    model = backbone.load_vgg16(info, "fc7", weights_arg)
    state = model.state_dict()
    state["classifier.6.weight"] = ck.weight.detach().clone()  # (C, 4096)
    state["classifier.6.bias"] = ck.bias.detach().clone()  # (C,)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with store.atomic_path(out) as tmp:
        torch.save(state, tmp)
    side = out.with_suffix(".json")
    side.write_text(
        json.dumps(
            {
                "classes": ck.classes,
                "num_classes": len(ck.classes),
                "preprocessing": ck.meta["features"]["preprocessing"],
                "weights": ck.meta["features"]["weights"],
                "load": f"torchvision.models.vgg16(num_classes={len(ck.classes)}).load_state_dict(torch.load('{out.name}'))",
                "metrics": ck.meta["metrics"],
            },
            indent=2,
        )
        + "\n"
    )
    return side
