"""Frozen configuration dataclasses; CLI options map one-to-one onto their fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from flowerfeat.errors import FlowerfeatError

DEFAULT_MODEL = "vgg16"  # the textbook's; `flowerfeat models` lists the others
PRECISIONS = ("auto", "fp32", "bf16", "int8")  # int8: the CPU, on the onnxruntime engine (quantize.py)
DTYPES = ("float32", "float16")
ENGINES = ("torch", "onnxruntime")
ENGINE_CHOICES = ("auto", *ENGINES)
DECODES = ("auto", "cpu", "gpu", "hybrid")
COMPRESSIONS = ("none", "lzf", "gzip")
OPTIMIZERS = ("adam", "sgd")
SOLVERS = ("sgd", "lbfgs")
SCHEDULES = ("cosine", "constant")
INITS = ("ridge", "class-means", "random")
EXPORT_FORMATS = ("auto", "torchvision", "pt2", "onnx")
# --batch-size 0 (auto) per device type: the fastest size measured on each (docs/benchmarks.md has the figures)
AUTO_BATCH_SIZE = {"cpu": 16, "cuda": 256}
# Heads go to RUNS_DIR/<the features' folder name>/head.pt unless told otherwise
RUNS_DIR = Path("data/runs")


def batch_size_for(device_type: str, batch_size: int) -> int:
    """``batch_size``, or the auto size for ``device_type`` ("cpu", "cuda") when it is 0."""
    return batch_size or AUTO_BATCH_SIZE["cuda" if device_type == "cuda" else "cpu"]


def field_name(name: str) -> str:
    """A field as both of its readers know it: ``batch_size (--batch-size)``."""
    return f"{name} (--{name.replace('_', '-')})"


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise FlowerfeatError(f"unknown {field_name(name)} {value!r}; choose one of: {', '.join(choices)}")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise FlowerfeatError(f"{field_name(name)} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_range(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise FlowerfeatError(f"{field_name(name)} must be in [0, 1), got {value}")


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that decides how features are extracted (and, where it changes them, their fingerprint); every
    field is a ``flowerfeat features`` option and a keyword of ``flowerfeat.extract``.

    Example::

        flowerfeat.extract("data/flower_photos", layer="pool5", batch_size=32, dtype="float16")
    """

    data: Path = Path("data/flower_photos")
    out: Path = Path("data/features")
    # vgg16, any torchvision classification model (resnet50, vit_b_16, ...) or timm:<name> (the [timm] extra)
    model: str = DEFAULT_MODEL
    layer: str | None = None  # the model's cut; None = its default (vgg16: fc7; others: pre-logits)
    # "imagenet" = the model's published weights (VGG16: IMAGENET1K_V1); "none" = seeded random init; else a path.
    weights: str = "imagenet"
    splits: tuple[str, ...] = ("train", "test")
    # > 0: carve a test split of this fraction out of a folder without one (flat <class>/ folders, train/ alone, a
    # CSV without a split column), stratified and by file name
    test_fraction: float = 0.0
    batch_size: int = 0  # 0 = auto: AUTO_BATCH_SIZE for the device
    workers: int | None = None  # reader processes beside the trunk; None = auto (extraction.default_workers)
    precision: str = "auto"
    dtype: str = "float32"  # storage dtype of the features dataset
    # HDF5 filter on the features. Sparse rows (pool5, after a ReLU) compress well at the cost of a slower full
    # read; dense rows gain little, so the default is none (docs/benchmarks.md has the figures).
    compression: str = "none"
    views: int = 0  # extra augmented views per training image (test splits always get the centre crop only)
    view_seed: int = 0
    device: str = "auto"
    # "cpu" = PIL decode + transforms() in workers; "gpu" = batched torchvision.io JPEG decode (nvjpeg on CUDA) +
    # resize on the device; "hybrid" = JPEG decode in the workers (libjpeg-turbo, PIL's pixels) + resize on the
    # device; other files fall back to the CPU path; "auto" = gpu on CUDA, else cpu.
    decode: str = "auto"
    strict: bool = False  # exit non-zero when any image was skipped
    channels_last: bool = True
    compile: bool = False  # torch.compile the trunk: compiling costs seconds, so it pays on CUDA for large sets
    # What runs the trunk on a CPU: "torch" (oneDNN), "onnxruntime" (the [onnx] extra; see docs/benchmarks.md,
    # docs/benchmarks.md) or "auto": the engine of the existing cache if it has one, else onnxruntime where it is
    # installed and the run is on the CPU in fp32, else torch.
    engine: str = "auto"
    # --precision int8: training images (a seeded, stratified sample) that calibrate the quantized trunk, once per cache
    calibration: int = 256  # the size measured to keep int8 heads within 0.5 points of fp32 (docs/benchmarks.md)

    def __post_init__(self) -> None:
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("compression", self.compression, COMPRESSIONS)
        _check_positive("batch_size", self.batch_size, allow_zero=True)
        _check_choice("decode", self.decode, DECODES)
        _check_choice("engine", self.engine, ENGINE_CHOICES)
        if self.workers is not None:
            _check_positive("workers", self.workers, allow_zero=True)
        _check_positive("views", self.views, allow_zero=True)
        _check_positive("calibration", self.calibration)
        _check_range("test_fraction", self.test_fraction)
        if not self.splits:
            raise FlowerfeatError("no split to extract; pass --split train (or test)")

    def replace(self, **changes) -> "ExtractConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


@dataclass(frozen=True)
class FitConfig:
    """How the replacement head is trained on cached features; every field is a ``flowerfeat fit-head`` option and
    a keyword of ``flowerfeat.fit_head``.

    Example::

        flowerfeat.fit_head(train, epochs=2, solver="lbfgs", C=0.1)
    """

    # a feature file, one cache folder, or the root of the caches (then the latest extraction, or --layer's)
    features: Path = Path("data/features")
    out: Path | None = None  # None: RUNS_DIR/<the features' folder name>/head.pt
    epochs: int = 2
    batch_size: int = 20  # the textbook's
    # Adam with a cosine decay from the ridge start, at a learning rate set from the features, gets within 1 point
    # of a converged probe in 2 epochs (README, "Choosing the head's settings");
    # `--optimizer sgd --lr 0.001 --schedule constant --init random --dropout 0.5` is the textbook's.
    optimizer: str = "adam"
    # 0 = auto (train.choose): 2.7 / (mean L1 norm of a training row), times rows / features when the features
    # outnumber the rows
    lr: float = 0.0
    momentum: float = 0.0  # sgd only; the textbook uses plain SGD
    schedule: str = "cosine"  # learning rate over all steps: "cosine" decays to 0, "constant" is the textbook's
    # "ridge": start from the regularised least-squares fit (closed form); "class-means": each class's weights along
    # its mean feature; "random": nn.Linear's (the textbook's)
    init: str = "ridge"
    weight_decay: float = 0.0
    # None = auto: the dropout the model's own classifier applies at the cut (backbones.Cut.dropout: VGG16 fc7 0.5)
    dropout: float | None = None
    average: int = 1  # runs averaged into the head, each its epochs over another shuffle (steadier, k times the time)
    solver: str = "sgd"  # "sgd" = mini-batch training with --optimizer; "lbfgs" = full-batch logistic regression
    C: float = 0.1  # inverse L2 strength for --solver lbfgs
    val_fraction: float = 0.0
    seed: int = 0
    max_memory: float = 4.0  # GiB; larger feature files are streamed from disk chunk by chunk
    log_every: int = 20  # batches between running-loss lines, as the textbook

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("solver", self.solver, SOLVERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("init", self.init, INITS)
        _check_positive("epochs", self.epochs)
        _check_positive("batch_size", self.batch_size)
        _check_positive("lr", self.lr, allow_zero=True)
        _check_positive("C", self.C)
        _check_positive("momentum", self.momentum, allow_zero=True)
        _check_positive("weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("max_memory", self.max_memory)
        _check_positive("log_every", self.log_every)
        _check_positive("average", self.average)
        if self.dropout is not None:
            _check_range("dropout", self.dropout)
        _check_range("val_fraction", self.val_fraction)

    def replace(self, **changes) -> "FitConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}
