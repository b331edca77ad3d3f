"""Export a head with the trunk that made its features as a model that runs without flowerfeat: a torchvision state
dict (heads on a torchvision model's last-layer input: VGG16 fc7, any model's pre-logits), a ``torch.export`` program
or ONNX (any model and layer), each with a JSON of classes and the preprocessing beside it."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flowerfeat import store
from flowerfeat.errors import FlowerfeatError
from flowerfeat.heads import Head, LinearHead
from flowerfeat.predict import head_recipe
from flowerfeat.recipe import Recipe, build

FORMATS = {".pth": "torchvision", ".pt2": "pt2", ".onnx": "onnx"}  # suffix -> format
ONNX_MODULES = ("onnx", "onnxscript")  # what torch.onnx.export needs; onnxruntime runs the result


@dataclass(frozen=True)
class Exported:
    """What ``export_model`` wrote: the model file and the JSON beside it."""

    model: Path
    sidecar: Path
    format: str


class ExportedClassifier(nn.Module):
    """The trunk cut plus the trained head, in eval mode: (B, 3, H, W) images, preprocessed as the JSON says,
    -> (B, C) class probabilities."""

    def __init__(self, trunk: nn.Module, head: LinearHead):
        super().__init__()
        self.trunk = trunk
        self.classifier = head  # the new last layer (for VGG16 fc7, classifier[6])
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(self.trunk(x)), dim=1)  # (B, C)


def choose_format(out: Path, fmt: str | None) -> str:
    """``fmt``, or the one ``out``'s suffix names (.pth torchvision, .pt2 pt2, .onnx onnx)."""
    if fmt in (None, "auto"):
        fmt = FORMATS.get(Path(out).suffix.lower())
        if fmt is None:
            raise FlowerfeatError(
                f"{out}: say which format with --format torchvision, pt2 or onnx (or name it .pth, .pt2, .onnx)"
            )
    if fmt not in FORMATS.values():
        raise FlowerfeatError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS.values())}")
    return fmt


def check_exportable(head: Head, fmt: str) -> None:
    """Refuse what cannot be exported before anything else is asked for (weights, time)."""
    backbone = head.recipe.backbone
    if fmt == "torchvision" and (backbone.classifier_cut is None or head.layer != backbone.classifier_cut):
        own = f"{head.model}'s is {backbone.classifier_cut}" if backbone.classifier_cut else f"{head.model} has none"
        raise FlowerfeatError(
            f"the head was trained on {head.model} {head.layer} features; a torchvision state dict holds a head on "
            f"the rows the model's own last layer takes ({own}): export it with --format pt2 or onnx"
        )
    missing = [m for m in ONNX_MODULES if fmt == "onnx" and importlib.util.find_spec(m) is None]
    if missing:
        raise FlowerfeatError(
            f"ONNX export needs {' and '.join(missing)}; install the extra: pip install 'flowerfeat[onnx]'"
        )


def export_model(
    head: Head | str | Path, out: str | Path, fmt: str | None = None, weights: str | None = None
) -> Exported:
    """Write ``head`` with its trunk to ``out`` as ``fmt`` (default: by the suffix), plus ``out`` with ``.json``.

    Example::

        flowerfeat.export_model("data/runs/vgg16-pool5-gap-imagenet/head.pt", "flowers.pt2")
        # elsewhere, without flowerfeat:
        model = torch.export.load("flowers.pt2").module()
        probabilities = model(images)  # (B, 3, H, W) preprocessed as flowers.json says
    """
    head = head if isinstance(head, Head) else Head.load(head)
    out = Path(out)
    fmt = choose_format(out, fmt)
    check_exportable(head, fmt)
    recipe = head_recipe(head, weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchvision":
        _write_torchvision(head, recipe, out)
    else:
        int8 = fmt == "onnx" and recipe.precision == "int8"  # the very int8 trunk, joined to the head
        trunk = build(recipe if int8 else recipe.exportable(), channels_last=False)
        if int8:
            _write_onnx_int8(head, trunk.module.path, out, _onnx_metadata(head))
        else:
            model = ExportedClassifier(trunk.module, head.module)
            if fmt == "pt2":
                _write_pt2(model, out, recipe.preprocessing.input_shape)
            else:
                _write_onnx(model, out, recipe.preprocessing.input_shape, _onnx_metadata(head))
    sidecar = out.with_name(out.name + ".json")  # m.pt2.json beside m.pt2: another format keeps its own
    sidecar.write_text(json.dumps(_description(head, out, fmt, recipe.preprocessing.input_shape), indent=2) + "\n")
    return Exported(out, sidecar, fmt)


def _example(input_shape: tuple[int, int, int]) -> tuple[torch.Tensor, dict]:
    """A batch to trace with, and a batch size left free."""
    return torch.zeros(2, *input_shape), {"x": {0: torch.export.Dim.DYNAMIC}}


def _write_torchvision(head: Head, recipe: Recipe, out: Path) -> None:
    state = recipe.backbone.torchvision_state(recipe.weights, head)
    with store.atomic_path(out) as tmp:
        torch.save(state, tmp)


def _write_pt2(model: nn.Module, out: Path, input_shape) -> None:
    x, dynamic = _example(input_shape)
    with torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes=dynamic)
    with store.atomic_path(out) as tmp:
        torch.export.save(program, tmp)


def _onnx_metadata(head: Head) -> dict[str, str]:
    """What an ONNX model carries about itself (``metadata_props``): its classes in output order and the
    preprocessing its input needs, as JSON, and where it came from."""
    return {
        "classes": json.dumps(head.classes),
        "preprocessing": json.dumps(head.meta["features"]["preprocessing"]),
        "flowerfeat": head.source_line(),
    }


def _write_onnx(model: nn.Module, out: Path, input_shape, metadata: dict[str, str]) -> None:
    x, dynamic = _example(input_shape)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        program = torch.onnx.export(
            model, (x,), dynamo=True, dynamic_shapes=dynamic, input_names=["image"], output_names=["probabilities"]
        )
    program.model.metadata_props.update(metadata)
    with store.atomic_path(out) as tmp:
        program.save(str(tmp), external_data=False)  # one file: ONNX's limit is 2 GB (VGG16 is 0.5 GB)


class _Probabilities(nn.Module):
    def __init__(self, head: LinearHead):
        super().__init__()
        self.head = head

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(rows), dim=1)


def _write_onnx_int8(head: Head, trunk_path: Path, out: Path, metadata: dict[str, str]) -> None:
    """The very int8 trunk the head's features came from (its QDQ graph) with the head after it, as one ONNX model:
    the head exported on its own, then joined to the trunk's output by onnx.compose."""
    import tempfile

    import onnx
    from onnx import compose, version_converter

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            _Probabilities(head.module).eval(), (torch.zeros(2, head.weight.shape[1]),), f"{tmp}/head.onnx",
            dynamo=True, dynamic_shapes={"rows": {0: torch.export.Dim.DYNAMIC}}, input_names=["rows"],
            output_names=["probabilities"], external_data=False,
        )  # fmt: skip
        head_model = compose.add_prefix(onnx.load(f"{tmp}/head.onnx"), "head/")
    trunk = onnx.load(str(trunk_path))
    head_model.ir_version = trunk.ir_version  # onnx.compose wants one IR version and the same opset imports
    joined = compose.merge_models(
        trunk, version_converter.convert_version(head_model, trunk.opset_import[0].version),
        io_map=[("rows", "head/rows")],
    )  # fmt: skip
    onnx.helper.set_model_props(joined, metadata)
    with store.atomic_path(out) as tmp_out:
        onnx.save(joined, str(tmp_out))


def _description(head: Head, out: Path, fmt: str, input_shape) -> dict:
    """The JSON beside the model: what goes in, what comes out, how to load it, where it came from."""
    load = {
        "torchvision": f"m = torchvision.models.get_model('{head.model}', num_classes={len(head.classes)}); "
        f"m.load_state_dict(torch.load('{out.name}')); m.eval()  # outputs logits",
        "pt2": f"m = torch.export.load('{out.name}').module()  # outputs probabilities",
        "onnx": f"s = onnxruntime.InferenceSession('{out.name}'); s.run(None, {{'{_input_name(head, fmt)}': x}})"
        "  # probabilities",
    }[fmt]
    return {
        "format": fmt,
        "file": out.name,
        "load": load,
        "classes": head.classes,
        "input": {"name": _input_name(head, fmt), "shape": ["batch", *input_shape], "dtype": "float32"},
        "output": {"shape": ["batch", len(head.classes)], "is": "logits" if fmt == "torchvision" else "probabilities"},
        "preprocessing": head.meta["features"]["preprocessing"],
        "model": head.model,
        "layer": head.layer,
        "weights": head.meta["features"]["weights"],
        "metrics": head.metrics,
    }


def _input_name(head: Head, fmt: str) -> str:
    """The exported model's input: "image"; an int8 ONNX model keeps its quantized trunk's, "x"."""
    return "x" if fmt == "onnx" and head.meta["features"]["precision"] == "int8" else "image"
