"""Do exported models give predict's answers without flowerfeat? Loads each exported file as its JSON says (a
``torch.export`` program with torch, an ONNX file with onnxruntime), preprocesses the images with torchvision's
public transforms from the JSON's record, and counts the images whose top-1 class equals the one in predict's CSV.
Imports nothing from flowerfeat.

    flowerfeat predict data/flower_photos/test --output preds.csv
    flowerfeat export model.pt2 && flowerfeat export model.onnx
    python scripts/export_agreement.py preds.csv model.pt2 model.onnx
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T


def transform(pre: dict):
    """The preprocessing record (resize, centre crop, normalise) as torchvision's transforms."""
    return T.Compose([
        T.Resize(pre["resize_size"], interpolation=T.InterpolationMode(pre["interpolation"]),
                 antialias=pre.get("antialias", True)),
        T.CenterCrop(pre["crop_size"]),
        T.PILToTensor(),
        T.ConvertImageDtype(torch.float),
        T.Normalize(pre["mean"], pre["std"]),
    ])  # fmt: skip


def runner(model: Path, about: dict):
    """(B, 3, H, W) float32 array -> (B, C) probabilities, by the file's format."""
    if about["format"] == "pt2":
        m = torch.export.load(str(model)).module()
        return lambda x: m(torch.from_numpy(x)).detach().numpy()
    import onnxruntime as ort

    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return lambda x: s.run(None, {about["input"]["name"]: x})[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("predictions", type=Path, help="predict's --output CSV (top-1 rows are read)")
    ap.add_argument("models", type=Path, nargs="+", help="exported .pt2 / .onnx files, each with its .json beside it")
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    with open(a.predictions) as f:
        wanted = {r["path"]: r["class"] for r in csv.DictReader(f) if r["rank"] == "1"}
    paths = sorted(wanted)
    for model in a.models:
        about = json.loads(model.with_name(model.name + ".json").read_text())
        run, pre = runner(model, about), transform(about["preprocessing"])
        got = []
        with torch.inference_mode():
            for i in range(0, len(paths), a.batch):
                x = torch.stack([pre(Image.open(p).convert("RGB")) for p in paths[i : i + a.batch]]).numpy()
                got += [about["classes"][k] for k in np.asarray(run(x)).argmax(1)]
        same = sum(g == wanted[p] for g, p in zip(got, paths))
        print(f"{model.name} ({about['format']}): top-1 equal to predict's on {same}/{len(paths)} images", flush=True)


if __name__ == "__main__":
    main()
