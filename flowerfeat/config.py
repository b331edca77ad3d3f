"""Frozen configuration dataclasses: each option's name, type, default, choices and help are declared once, here;
the CLI generates its options from these fields (cli.py, ``config_options``) and passes the validated object down."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from flowerfeat.errors import FlowerfeatError

DEFAULT_MODEL = "vgg16"  # the textbook's; `flowerfeat models` lists the others
PRECISIONS = ("auto", "fp32", "bf16", "int8")  # int8: the CPU, on the onnxruntime engine (quantize.py)
ENGINES = ("torch", "onnxruntime")
# --batch-size 0 (auto) per device type: the fastest size measured on each (docs/benchmarks.md has the figures)
AUTO_BATCH_SIZE = {"cpu": 16, "cuda": 256}


# What FitConfig's open settings (None) become, by what trains: the new last layer alone, or the top of the trunk
# with it (--train-top). The linear head's: the textbook's batch, 2 epochs (README, "Choosing the head's settings");
# the top's: the recipe measured on the flower photos (docs/heads.md), its epochs following the training rows
# (None: fit_top.default_epochs).
FIT_DEFAULTS = {
    "linear": {"epochs": 2, "batch_size": 20, "weight_decay": 0.0, "label_smoothing": 0.0},
    "top": {"epochs": None, "batch_size": 64, "weight_decay": 0.05, "label_smoothing": 0.1},
}


def option(default, help: str, *, choices: tuple | None = None, flag: str | None = None, metavar: str | None = None,
           cli: bool = True):  # fmt: skip
    """A config field and its command-line option: ``help`` is the option's help, ``choices`` the values it takes
    (checked here and offered by the CLI), ``flag`` the option's name where it is not the field's (``--split`` for
    ``splits``), ``cli=False`` a field the CLI does not offer."""
    meta = {"help": help, "choices": choices, "flag": flag, "metavar": metavar, "cli": cli}
    return dataclasses.field(default=default, metadata=meta)


def batch_size_for(device_type: str, batch_size: int) -> int:
    """``batch_size``, or the auto size for ``device_type`` ("cpu", "cuda") when it is 0."""
    return batch_size or AUTO_BATCH_SIZE["cuda" if device_type == "cuda" else "cpu"]


def flag_of(field: dataclasses.Field) -> str:
    """The option's name on the command line: ``batch_size`` -> ``--batch-size``."""
    return "--" + (field.metadata.get("flag") or field.name).replace("_", "-")


def field_name(name: str) -> str:
    """A field as both of its readers know it: ``batch_size (--batch-size)``."""
    return f"{name} (--{name.replace('_', '-')})"


def _check_choices(cfg) -> None:
    for f in dataclasses.fields(cfg):
        choices, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if choices and value not in choices:
            raise FlowerfeatError(f"unknown {field_name(f.name)} {value!r}; choose one of: {', '.join(choices)}")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise FlowerfeatError(f"{field_name(name)} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_range(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise FlowerfeatError(f"{field_name(name)} must be in [0, 1), got {value}")


class _Config:
    """What both configs share: ``replace`` and ``to_dict`` (paths as strings, tuples as lists)."""

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_options(cls, caller: str, options: dict, **given):
        """The config of a library call's keyword ``options``; an unknown keyword is a TypeError naming it."""
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"{caller}() got unknown option(s) {', '.join(unknown)}; see flowerfeat.{cls.__name__}")
        if isinstance(options.get("splits"), str):
            options = {**options, "splits": (options["splits"],)}
        return cls(**given, **options)


@dataclass(frozen=True)
class ExtractConfig(_Config):
    """Everything that decides how features are extracted (and, where it changes them, their fingerprint); every
    field is a ``flowerfeat features`` option and a keyword of ``flowerfeat.extract``.

    Example::

        flowerfeat.extract("data/flower_photos", layer="pool5", batch_size=32, dtype="float16")
    """

    data: Path = option(
        Path("data/flower_photos"),
        "Images: a folder with train/<class>/ and test/<class>/, a folder of <class>/ folders (with "
        "--test-fraction), or a CSV of path,label rows (paths relative to the CSV).",
    )
    out: Path = option(
        Path("data/features"), "Root of the caches: <out>/<data set>-<hash>/<model>-<layer>-<weights>/<split>.h5."
    )
    model: str = option(
        DEFAULT_MODEL,
        "vgg16 (the textbook's), any torchvision classification model (resnet50, efficientnet_b0, ...) or a "
        "family's PREFIX:NAME (timm:<name>, the [timm] extra); `flowerfeat models` lists them.",
        metavar="MODEL",
    )
    layer: str | None = option(
        None, "Where the model is cut; default: its first cut (vgg16: fc7; others: pre-logits). "
        "`flowerfeat models` lists each model's cuts.", metavar="LAYER",
    )  # fmt: skip
    weights: str = option(
        "imagenet",
        "imagenet (the model's published weights; VGG16: torchvision IMAGENET1K_V1), a local state-dict PATH in "
        "the model's own key names, or none (seeded random init).",
    )
    # () = every split the data set has: train, and val and test where present (layouts.py)
    splits: tuple[str, ...] = option(
        (), "Split(s) to extract (repeatable): train, val or test; default: every split the data has.", flag="split",
        metavar="SPLIT",
    )  # fmt: skip
    test_fraction: float = option(
        0.0,
        "Carve a test split of this fraction out of data without one (flat <class>/ folders, train/ alone, a CSV "
        "without a split column); stratified, by file name.",
    )
    batch_size: int = option(
        0, f"Images per trunk batch; 0 = auto ({AUTO_BATCH_SIZE['cpu']} on a CPU, {AUTO_BATCH_SIZE['cuda']} on CUDA)."
    )
    workers: int | None = option(
        None, "Readers beside the trunk: threads on the CPU (default 2), processes on a GPU (default: auto, "
        "docs/gpus.md); 0 reads between batches."
    )
    precision: str = option(
        "auto", "auto (bf16 on CUDA; on a CPU torch's bf16 where it has native bf16, else fp32, or onnxruntime's "
        "fp32, as --engine auto measures), fp32, bf16 or int8 (a quantized trunk on the CPU, the [onnx] extra).",
        choices=PRECISIONS,
    )  # fmt: skip
    # float16 halves the files; auto: the cut's own (backbones.Cut.dtype: float32 for pooled rows, float16 for the
    # activations of a cut below the top, which keep their values within 1e-3)
    dtype: str = option(
        "auto", "Storage dtype of the features: auto (the cut's own: float16 for activations below the top, else "
        "float32), float32 or float16.", choices=("auto", "float32", "float16"),
    )  # fmt: skip
    # Sparse rows (pool5, after a ReLU) compress well at the cost of a slower full read; dense rows gain little, so
    # the default is none (docs/benchmarks.md has the figures).
    compression: str = option(
        "none", "HDF5 filter for the features: none, lzf or gzip (pays for sparse pool5).",
        choices=("none", "lzf", "gzip"),
    )  # fmt: skip
    views: int = option(0, "Extra augmented views per training image (RandomResizedCrop + flip, seeded).")
    view_seed: int = option(0, "Seed of the augmented views.")
    # the smallest share of the image an augmented view crops (RandomResizedCrop's scale); docs/heads.md has the
    # measurement behind the default
    view_scale: float = option(0.25, "Smallest share of the image an augmented view crops (RandomResizedCrop's scale).")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    decode: str = option(
        "auto", "auto (gpu on CUDA, else cpu), cpu (PIL in the workers), draft (as cpu, a large JPEG decoded at a "
        "reduced scale that still covers the resize: several times faster), gpu (nvjpeg: batched JPEG decode on the "
        "device) or hybrid (JPEG decode in the workers, PIL's pixels; resize on the device).",
        choices=("auto", "cpu", "draft", "gpu", "hybrid"),
    )  # fmt: skip
    strict: bool = option(False, "Exit 1 when any image was skipped as unreadable.")
    channels_last: bool = option(True, "channels-last memory format for the torch trunk.", cli=False)
    # compiling costs seconds, so it pays on CUDA for large sets (docs/benchmarks.md)
    compile: bool = option(False, "torch.compile the trunk (compiling costs seconds, so for large image sets on CUDA).")
    engine: str = option(
        "auto", "What runs the trunk on a CPU: torch, onnxruntime (the [onnx] extra), or auto (the cache's engine; "
        "for a new cache the faster of the two, measured once per model and CPU and kept, or onnxruntime with "
        "--precision fp32; torch without the extra).",
        choices=("auto", *ENGINES),
    )  # fmt: skip
    # 256: the size measured to keep int8 heads within 0.5 points of fp32 (docs/benchmarks.md)
    calibration: int = option(
        256, "--precision int8: training images (a seeded, stratified sample) that calibrate the quantized trunk."
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        _check_positive("batch_size", self.batch_size, allow_zero=True)
        if self.workers is not None:
            _check_positive("workers", self.workers, allow_zero=True)
        _check_positive("views", self.views, allow_zero=True)
        if not 0 < self.view_scale <= 1:
            raise FlowerfeatError(f"{field_name('view_scale')} must be in (0, 1], got {self.view_scale}")
        _check_positive("calibration", self.calibration)
        _check_range("test_fraction", self.test_fraction)
        unknown = [s for s in self.splits if s not in ("train", "val", "test")]
        if unknown:
            raise FlowerfeatError(f"unknown split (--split) {unknown[0]!r}; choose train, val or test")


@dataclass(frozen=True)
class FitConfig(_Config):
    """How the replacement head is trained on cached features; every field is a ``flowerfeat fit-head`` option and
    a keyword of ``flowerfeat.fit_head``.

    Example::

        flowerfeat.fit_head(train, epochs=2, solver="lbfgs", C=0.1)
    """

    features: Path = option(
        Path("data/features"),
        "A feature file, a cache folder, or the root of the caches (then the latest extraction, or --layer's).",
    )
    out: Path | None = option(
        None, "Where the head goes; default: heads/<name>.pt beside the training features (see --name)."
    )
    name: str | None = option(
        None, "The head's name in heads/ beside its features; default: its settings and a digest of them and of the "
        "features (another fit never takes an existing name).",
    )  # fmt: skip
    replace_head: bool = option(False, "Replace a head already at --out or --name (else refused).", flag="replace")
    # trains the top of the trunk above a cut below the top, with the head: fit_top.py
    train_top: bool = option(False, "Train the top of the trunk above the cut too (features of a cut below the top).")
    device: str = option("auto", "--train-top: where the top trains: auto (a GPU where there is one), cpu, cuda:N.")
    weights: str | None = option(
        None, "--train-top: the trunk's weights, the top's start (default: those the features came from)."
    )
    epochs: int | None = option(
        None, "Passes over the training features; default 2 (--train-top: 4, more where 4 make under 200 steps)."
    )
    batch_size: int | None = option(None, "Mini-batch size; default 20, the textbook's (--train-top: 64).")
    # Adam with a cosine decay from the ridge start, at a learning rate set from the features, gets within 1 point
    # of a converged probe in 2 epochs (README, "Choosing the head's settings")
    optimizer: str = option("adam", "adam or sgd (the textbook's, with --lr 0.001).", choices=("adam", "sgd"))
    # 0 = auto (train.choose): 2.7 / (mean L1 norm of a training row), times rows / features when the features
    # outnumber the rows
    lr: float = option(
        0.0, "Learning rate (peak with --schedule cosine); 0 = auto from the features' scale (--train-top: the new "
        "layer's peak, 3e-3; the top learns at a tenth).",
    )  # fmt: skip
    momentum: float = option(0.0, "SGD momentum (the textbook: 0).")
    schedule: str = option(
        "cosine", "cosine (decays to 0 over the run) or constant (the textbook's).", choices=("cosine", "constant")
    )
    init: str = option(
        "ridge", "ridge (start at the regularised least-squares fit), class-means, or random (the textbook).",
        choices=("ridge", "class-means", "random"),
    )  # fmt: skip
    weight_decay: float | None = option(None, "L2 weight decay; default 0 (--train-top: 0.05, decoupled: AdamW).")
    label_smoothing: float | None = option(None, "Label smoothing; default 0 (--train-top: 0.1).")
    # None = auto: the dropout the model's own classifier applies at the cut (backbones.Cut.dropout: VGG16 fc7 0.5)
    dropout: float | None = option(
        None, "Dropout before the layer; default: the model's own classifier's at the cut (VGG16: 0.5 at fc6/fc7)."
    )
    average: int = option(1, "Runs averaged into the head, each over another shuffle (k times the training time).")
    solver: str = option(
        "sgd", "sgd (mini-batch, uses --optimizer) or lbfgs (full-batch logistic regression).", choices=("sgd", "lbfgs")
    )
    C: float = option(0.1, "Inverse L2 strength for --solver lbfgs.")
    val_fraction: float = option(0.0, "Hold out this fraction of training images (stratified); keep the best epoch.")
    seed: int = option(0, "Seed for init, shuffling and dropout: same seed, bit-identical head.")
    max_memory: float = option(4.0, "GiB; larger feature files are streamed from disk.")
    log_every: int = option(20, "Batches between running-loss lines, as the textbook.", cli=False)

    def __post_init__(self) -> None:
        _check_choices(self)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        _check_positive("lr", self.lr, allow_zero=True)
        _check_positive("C", self.C)
        _check_positive("momentum", self.momentum, allow_zero=True)
        if self.weight_decay is not None:
            _check_positive("weight_decay", self.weight_decay, allow_zero=True)
        if self.label_smoothing is not None:
            _check_range("label_smoothing", self.label_smoothing)
        _check_positive("max_memory", self.max_memory)
        _check_positive("log_every", self.log_every)
        _check_positive("average", self.average)
        if self.dropout is not None:
            _check_range("dropout", self.dropout)
        _check_range("val_fraction", self.val_fraction)

    def settled(self) -> FitConfig:
        """The config with its open settings (None) filled by what trains (FIT_DEFAULTS): what a head records."""
        defaults = FIT_DEFAULTS["top" if self.train_top else "linear"]
        return self.replace(**{k: v for k, v in defaults.items() if getattr(self, k) is None})
