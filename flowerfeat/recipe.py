"""The recipe of a trunk: one frozen record of everything that decides its rows (model, cut, weights, preprocessing,
decoder, precision, engine, int8 settings), resolved once from the options, the machine and the existing cache;
written into every feature file and head; and ``build``, the one way a runnable trunk is made from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from flowerfeat import runtime, store
from flowerfeat.backbones import Backbone, Preprocessing, get_backbone
from flowerfeat.config import ExtractConfig
from flowerfeat.errors import FlowerfeatError
from flowerfeat.progress import Reporter
from flowerfeat.store import EngineFiles, atomic_path, engine_of
from flowerfeat.weights import WeightsInfo, resolve_local, sha256_file


@dataclass(frozen=True)
class Recipe:
    """What makes a trunk's rows. Its fields are the feature file's attributes of the same names (``to_attrs``),
    so plain h5py reads them, and a file or a head's record gives the recipe back (``from_attrs``).

    Example::

        recipe = flowerfeat.recipe.Recipe.from_attrs(flowerfeat.load_features("train.h5").meta)
        trunk = flowerfeat.recipe.build(recipe)     # the very trunk that made the file
    """

    model: str  # the registry's name: vgg16, resnet50, timm:tf_efficientnet_lite0, ...
    layer: str  # the model's cut
    feature_dim: int
    cut_dropout: float  # the dropout the model's own classifier applies at the cut
    weights: WeightsInfo
    preprocessing: Preprocessing
    decoder: str  # what makes the pixels: pil, libjpeg (torchvision's CPU decoder) or nvjpeg
    precision: str  # fp32, bf16 or int8
    engine: str  # torch or onnxruntime
    quantization: dict | None = None  # int8: quantize.Settings as a dict
    artefact: dict | None = None  # the engine file the rows were made with (int8, ONNX fp32): {path, sha256}; not keyed
    dtype: str = "float32"  # how the rows are stored (float16 halves them; activations default to it)

    @property
    def backbone(self) -> Backbone:
        return get_backbone(self.model)

    def replace(self, **changes) -> Recipe:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line: ``vgg16 pool5, weights vgg16_conv.pth (sha256 26fd6915...), fp32 on torch, decoded by pil``."""
        w = self.weights
        what = {"hub": "published weights", "none": "random init"}.get(w.kind, f"weights {w.name}")
        sha = f" (sha256 {w.sha256[:8]})" if w.sha256 else ""
        return f"{self.model} {self.layer}, {what}{sha}, {self.precision} on {self.engine}, decoded by {self.decoder}"

    def to_attrs(self) -> dict:
        """The recipe as feature-file attributes (store.SCHEMA names them)."""
        return {
            "model": self.model,
            "layer": self.layer,
            "feature_dim": self.feature_dim,
            "cut_dropout": self.cut_dropout,
            "weights": self.weights.identity,
            "weights_sha256": self.weights.sha256,
            "weights_path": self.weights.path,
            "preprocessing": self.preprocessing.to_dict(),
            "decoder": self.decoder,
            "precision": self.precision,
            "engine": self.engine,
            "quantization": self.quantization,
            "quantized_model": self.artefact,
            "dtype": self.dtype,
        }

    @classmethod
    def from_attrs(cls, meta: dict) -> Recipe:
        """The recipe recorded in a feature file's attributes or a head's record."""
        sha, path = meta.get("weights_sha256") or "", meta.get("weights_path") or ""
        weights = WeightsInfo.from_identity(meta["weights"], sha, path)
        return cls(
            meta["model"], meta["layer"], int(meta["feature_dim"]), float(meta.get("cut_dropout") or 0.0), weights,
            Preprocessing.from_dict(meta["preprocessing"]), meta.get("decoder") or "pil", meta["precision"],
            engine_of(meta), meta.get("quantization"), meta.get("quantized_model"), meta.get("dtype") or "float32",
        )  # fmt: skip

    def found(self, weights: str | None = None) -> Recipe:
        """This recipe with its weights found: ``weights`` when given, else from the record (the model's published
        ones; a file at its recorded path, checked by its sha256). Other weights or preprocessing are refused with
        one line, before anything is loaded."""
        backbone = self.backbone
        info = backbone.resolve_weights(weights) if weights is not None else _remembered(self, backbone)
        moved = info.kind == "file" and info.sha256 and info.sha256 == self.weights.sha256  # renamed: same bytes
        if info.identity != self.weights.identity and not moved:
            raise FlowerfeatError(
                f"--weights {weights} is {info.identity[:70]}, but the head was trained on features from "
                f"{self.weights.identity[:70]}; pass the same weights"
            )
        if backbone.preprocessing(info) != self.preprocessing:
            raise FlowerfeatError("the head was trained on features with other preprocessing; re-extract and refit it")
        return self.replace(weights=info)

    def exportable(self) -> Recipe:
        """The same trunk as torch computes it in fp32: what export writes and the reference engines agree with."""
        return self.replace(precision="fp32", engine="torch", quantization=None, artefact=None)


def _remembered(recipe: Recipe, backbone: Backbone) -> WeightsInfo:
    """The weights that reproduce the head's trunk, from its record; a one-line error when the file moved."""
    w = recipe.weights
    if w.kind == "hub":
        return backbone.resolve_weights("imagenet")
    if w.kind == "none":
        return backbone.resolve_weights("none")
    if w.path and Path(w.path).is_file():
        found = resolve_local(w.path, recipe.model)
        if found.sha256 == w.sha256:
            return found
        where = f"; {w.path} has changed since"
    else:
        where = f", no longer at {w.path}" if w.path else ""
    raise FlowerfeatError(
        f"the head's features came from weights {w.name} (sha256 {w.sha256 or 'unknown'}){where}; "
        "pass --weights PATH to that file"
    )


@dataclass(frozen=True)
class History:
    """What an existing cache says about how its rows were made: its engine and precision, and the int8 record kept
    there."""

    engine: str | None = None
    int8: dict | None = None  # quantize.Settings of the kept int8 trunk, as a dict
    precision: str | None = None


def decode_plan(decode: str, device: torch.device) -> tuple[str, str]:
    """(mode, decoder) for ``--decode`` on ``device``: mode cpu, gpu or hybrid (auto = gpu on CUDA, else cpu), and the
    decoder that makes the pixels, recorded in the recipe: pil, pil-draft (JPEG DCT scaling), nvjpeg, or libjpeg
    (torchvision's CPU decoder: hybrid's workers, or the gpu mode's own code on a machine without CUDA)."""
    mode = decode if decode != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    gpu = "nvjpeg" if device.type == "cuda" else "libjpeg"
    return mode, {"cpu": "pil", "draft": "pil-draft", "gpu": gpu, "hybrid": "libjpeg"}[mode]


def _precision(cfg: ExtractConfig, device: torch.device, past: History) -> str:
    """auto: fp32 for --engine onnxruntime; else the cache's own where this device runs it natively (it may have
    been chosen by measuring, fastest.py), else the device's rule (runtime.resolve_precision)."""
    native = runtime.resolve_precision(cfg.precision, device)
    if cfg.precision != "auto":
        return native
    if cfg.engine == "onnxruntime":
        return "fp32"
    return past.precision if past.precision == "fp32" or past.precision == native == "bf16" else native


def resolve(
    cfg: ExtractConfig, device: torch.device, history: Callable[[Backbone, str, WeightsInfo], History] | None = None
) -> Recipe:
    """The recipe for ``cfg`` on ``device``: every ``auto`` resolved here and only here. ``history`` tells what the
    cache of that model, cut and weights already holds, so ``--engine auto`` keeps the cache's engine and int8
    keeps its quantization. Nothing is loaded; an unknown model, cut or weights file is refused."""
    backbone = get_backbone(cfg.model)
    cut = backbone.cut(cfg.layer)
    weights = backbone.resolve_weights(cfg.weights)
    past = history(backbone, cut.name, weights) if history is not None else History()
    precision = _precision(cfg, device, past)
    engine = runtime.resolve_engine(cfg.engine, device, precision, past.engine)
    quantization = None
    if precision == "int8":
        from flowerfeat import quantize

        kept = past.int8 if past.int8 and past.int8.get("calibration") == cfg.calibration else None
        quantization = kept or quantize.settings_for_this_cpu(cfg.calibration, seed=0).to_dict()
    return Recipe(
        backbone.name, cut.name, cut.dim, cut.dropout, weights, backbone.preprocessing(weights),
        decode_plan(cfg.decode, device)[1], precision, engine, quantization,
        dtype=cut.dtype if cfg.dtype == "auto" else cfg.dtype,  # the cut declares its own storage
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Building: the trunk of a recipe, ready to run.


@dataclass
class Trunk:
    """A runnable trunk and the recipe it was built from (with the engine file it runs, for int8)."""

    module: nn.Module  # (B, 3, H, W) -> (B, D)
    recipe: Recipe
    device: torch.device
    channels_last: bool = False

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) float32 rows of preprocessed images already on the device."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return runtime.trunk_rows(self.module, x, self.recipe.precision)


def build(
    recipe: Recipe,
    device: torch.device | None = None,
    *,
    keep: EngineFiles | None = None,
    calibration: Callable[[], tuple] | None = None,
    channels_last: bool = True,
    compile: bool = False,
    reporter: Reporter | None = None,
    torch_trunk: nn.Module | None = None,
) -> Trunk:
    """The one way a runnable trunk is made: the recipe's model, cut and weights, as its engine runs it on
    ``device``. ONNX Runtime runs an engine file kept at ``keep`` (made there first when it is missing, damaged or
    made otherwise; an int8 one calibrated on ``calibration()``'s images), or else the file the recipe names; an
    fp32 export traces ``torch_trunk``, the recipe's torch trunk where it is already built (auto's measuring builds it
    first: the same file, the weights not loaded again)."""
    device = device or torch.device("cpu")
    reporter = reporter or Reporter()
    if recipe.precision == "int8":
        module, artefact = _int8(recipe, keep, calibration, reporter)
        return Trunk(module, recipe.replace(artefact=artefact), device)
    if recipe.engine == "onnxruntime":
        module, artefact = _onnx_fp32(recipe, keep, reporter, torch_trunk)
        return Trunk(module, recipe.replace(artefact=artefact), device)
    trunk = _torch_trunk(recipe, reporter).to(device)
    if channels_last:
        trunk = trunk.to(memory_format=torch.channels_last)
    if compile:  # pays on CUDA for large sets; compiles on the first batch (docs/benchmarks.md)
        trunk = torch.compile(trunk)
    return Trunk(trunk, recipe, device, channels_last)


def _torch_trunk(recipe: Recipe, reporter: Reporter) -> nn.Module:
    what = "random init" if recipe.weights.kind == "none" else recipe.weights.name
    with reporter.stage(f"loading {recipe.model} weights ({what})"):
        return recipe.backbone.build(recipe.weights, recipe.layer)


def traced_trunk(recipe: Recipe, reporter: Reporter | None = None, module: nn.Module | None = None) -> nn.Module:
    """The torch trunk (``module`` where it is built already) as the ONNX exporter traces it (its shapes fixed for
    the recipe's images)."""
    module = module if module is not None else _torch_trunk(recipe, reporter or Reporter())
    return recipe.backbone.for_tracing(module, recipe.preprocessing.input_shape)


def _int8(recipe: Recipe, keep: EngineFiles | None, calibration, reporter: Reporter) -> tuple[nn.Module, dict]:
    """The int8 trunk's engine file (checked by its sha256) loaded, and {path, sha256} to record."""
    from flowerfeat import quantize

    if keep is None:  # predict, export: the very file the features were made with
        made = _engine_file_made_with(recipe)
        if made is None:
            raise FlowerfeatError(
                f"{(recipe.artefact or {}).get('path', '')}: the int8 trunk the head's features were made with is gone "
                "or changed; extract the features again with --precision int8 and refit, or pass --precision fp32"
            )
        path, sha = made
    else:
        sha = keep.intact(recipe.quantization)
        if sha is None:
            if calibration is None:
                raise FlowerfeatError("--precision int8 calibrates on training images; extract the train split too")
            trunk = traced_trunk(recipe, reporter)
            sha = quantize.make(trunk, recipe.preprocessing, recipe.quantization, calibration, keep, reporter)
        path = keep.model
    with reporter.stage("loading the int8 trunk"):
        return runtime.OnnxModel(path), {"path": str(path.resolve()), "sha256": sha}


def runs_from_its_engine_file(recipe: Recipe) -> bool:
    """Whether ``recipe``'s trunk is the ONNX Runtime file its rows were made with, still there as it was made: then
    building it needs neither the model's family nor its weights (``Recipe.found`` can be skipped)."""
    return _engine_file_made_with(recipe) is not None


def _engine_file_made_with(recipe: Recipe) -> tuple[Path, str] | None:
    """(path, sha256) of the ONNX Runtime file ``recipe``'s rows were made with, where it is still there as it was
    made (int8: the file its artefact names, by that sha256; fp32: the export kept beside the cache with its record,
    for this torch and onnxruntime); else None."""
    if recipe.engine != "onnxruntime" or not recipe.artefact:
        return None
    path = Path(recipe.artefact["path"])
    if recipe.precision == "int8":
        sha = recipe.artefact.get("sha256")
        return (path, sha) if path.is_file() and sha256_file(path) == sha else None
    keep = store.engine_files(path.parent, "fp32")
    sha = keep.intact(onnx_settings(recipe))
    return None if sha is None else (keep.model, sha)


def onnx_settings(recipe: Recipe) -> dict:
    """What an exported fp32 ONNX trunk depends on besides the cache folder's model, cut and weights."""
    import onnxruntime

    return {"input_shape": list(recipe.preprocessing.input_shape), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__}  # fmt: skip


def _onnx_fp32(
    recipe: Recipe, keep: EngineFiles | None, reporter: Reporter, built: nn.Module | None = None
) -> tuple[nn.Module, dict | None]:
    """The trunk exported to ONNX for ONNX Runtime: the file kept at ``keep`` (exported there once), or for a head
    (``keep`` None) the one its features were made with where it is still there and intact, else exported now."""
    if keep is None:
        made = _engine_file_made_with(recipe)
        if made is not None:
            return runtime.OnnxModel(made[0]), {"path": str(made[0].resolve()), "sha256": made[1]}
        with reporter.stage("preparing the onnxruntime engine"):  # moved, changed, or another torch: nothing kept
            return runtime.onnx_trunk(traced_trunk(recipe, reporter, built), recipe.preprocessing.input_shape), None
    settings = onnx_settings(recipe)
    sha = keep.intact(settings)
    if sha is None:
        trunk = traced_trunk(recipe, reporter, built)
        keep.model.parent.mkdir(parents=True, exist_ok=True)
        stage = reporter.stage("exporting the trunk for onnxruntime (once for this cache)")
        with stage, atomic_path(keep.model) as tmp:
            runtime.export_onnx(trunk, recipe.preprocessing.input_shape, tmp)
        sha = keep.write_record(settings)
    return runtime.OnnxModel(keep.model), {"path": str(keep.model.resolve()), "sha256": sha}
