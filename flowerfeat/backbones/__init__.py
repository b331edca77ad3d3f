"""Backbones as plug-ins: a registry of models, each naming its cuts, preprocessing, weights and export.

A ``Backbone`` is one model: ``vgg16`` (the textbook's, with its four cuts), any torchvision classification model by
its name (``resnet50``, ``vit_b_16``, ...), or ``timm:<name>`` (the [timm] extra). Adding a family is one module that
defines a ``Family`` and calls ``register_family``; adding a single model, one ``register``. Nothing outside this
package names a family, a prefix or a model::

    from flowerfeat import backbones
    backbones.register("my-net", MyBackbone)           # a Backbone subclass, built on first use
    backbones.register_family(MyFamily())             # every "mine:<name>" its get() knows
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from flowerfeat.config import DEFAULT_MODEL
from flowerfeat.errors import FlowerfeatError
from flowerfeat.weights import WeightsInfo, safe_name

__all__ = [
    "Backbone", "Cut", "Family", "Flat", "stage_cut", "Preprocessing", "DEFAULT_MODEL", "get_backbone", "list_models",
    "register", "register_family", "suggested_models", "unregister", "unregister_family",
]  # fmt: skip


@dataclass(frozen=True)
class Cut:
    """Where a model is cut: its name (``--layer``), the row dimension, and the dropout the model's own classifier
    applies before its last layer (the head's default dropout). A cut below the top of the model also names the
    ``top`` that sits above it (trained on the cached rows by ``fit-head --train-top``), the ``shape`` of its
    activations (C, H, W; a row is them flattened) and the pooled dimension the top gives the head."""

    name: str
    dim: int
    dropout: float = 0.0
    about: str = ""  # one line for `flowerfeat models`
    top: str = ""  # what trains above the cut, in words ("" for a pooled cut: only the head trains)
    shape: tuple[int, ...] = ()  # (C, H, W) of the activations, for a cut below the top
    top_dim: int = 0  # what the top gives the head
    top_dropout: float = 0.0  # what the model drops out before its last layer when the top trains
    # how its rows are stored by default: activations are many values a row and float16 keeps them within 1e-3
    dtype: str = "float32"
    # the top trains in bf16 autocast where its rows were made in bf16 (a CPU or GPU with native bf16): dense
    # convolutions gain from it (VGG16's conv5 block: 1.9x a step), depthwise ones lose (EfficientNet's: 0.85x)
    top_bf16: bool = False
    # the pretrained top's share of the new layer's learning rate, where it differs from fit_top.TOP_LR_RATIO
    top_lr_ratio: float | None = None

    @property
    def trainable(self) -> bool:
        """Whether a top sits above the cut (``fit-head --train-top``)."""
        return bool(self.top)


def stage_cut(name: str, shape: tuple[int, ...], top: str, top_dim: int, top_dropout: float, about: str,
              dtype: str = "float16", top_bf16: bool = False, top_lr_ratio: float | None = None) -> Cut:  # fmt: skip
    """A cut below the top: its activations (stored float16 by default), the top above it named."""
    dim = 1
    for s in shape:
        dim *= s
    return Cut(name, dim, 0.0, about, top, tuple(shape), top_dim, top_dropout, dtype, top_bf16, top_lr_ratio)


# torchvision's InterpolationMode values -> Pillow's resampling filters (torchvision's own pil_modes_mapping)
PIL_FILTERS = {"nearest": 0, "nearest-exact": 0, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5, "lanczos": 1}


@dataclass(frozen=True)
class Pixels:
    """torchvision's ``Resize``, ``CenterCrop`` and ``PILToTensor`` on a PIL image, the same Pillow calls with the
    same sizes (tested value for value against them), without importing torchvision: its import (models, ops,
    torch._dynamo) is 1.1 s of a one-photo ``predict``'s 2.8 s. Picklable, for reader processes."""

    resize_size: tuple[int, ...]  # (s,): the shorter side to s, the longer int(s * long / short); (h, w)
    crop_size: tuple[int, ...]  # (s,) or (h, w)
    interpolation: str

    def __call__(self, img) -> torch.Tensor:
        import numpy as np

        img = self.cropped(self.resized(img))
        return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1)  # (3, H, W) uint8

    def resized(self, img):
        w, h = img.size
        if len(self.resize_size) == 1:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.resize_size[0], int(self.resize_size[0] * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)  # (width, height)
        else:
            size = (self.resize_size[1], self.resize_size[0])
        return img if size == (w, h) else img.resize(size, PIL_FILTERS[self.interpolation])

    def cropped(self, img):
        ch, cw = (self.crop_size * 2)[:2]
        w, h = img.size
        if (cw, ch) == (w, h):
            return img
        # a crop larger than the image is centred in zeros as torchvision pads it (the smaller half before)
        left = int(round((w - cw) / 2.0)) if cw <= w else -((cw - w) // 2)
        top = int(round((h - ch) / 2.0)) if ch <= h else -((ch - h) // 2)
        return img.crop((left, top, left + cw, top + ch))


@dataclass(frozen=True)
class Normalized:
    """``Preprocessing.transform``: its ``pixels``, then its ``normalize``."""

    preprocessing: Preprocessing

    def __call__(self, img) -> torch.Tensor:
        return self.preprocessing.normalize(self.preprocessing.pixels()(img)[None])[0]


@dataclass(frozen=True)
class Preprocessing:
    """The weights' own eval transform (torchvision's ``weights.transforms()``, timm's data config), as data: the
    record every feature file keeps, from which the transform is made (``transform``)."""

    resize_size: tuple[int, ...]  # (s,): the shorter side to s; (h, w): squashed to h x w
    crop_size: tuple[int, ...]  # (s,) or (h, w), centre crop
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # torchvision's InterpolationMode value: bilinear, bicubic, ...
    antialias: bool = True

    @classmethod
    def of(cls, t) -> Preprocessing:
        """From the attributes of torchvision's ``ImageClassification`` (what ``weights.transforms()`` returns)."""
        return cls(
            tuple(t.resize_size), tuple(t.crop_size), tuple(t.mean), tuple(t.std), t.interpolation.value, t.antialias
        )

    def transform(self) -> Normalized:
        """PIL RGB image -> normalised (3, H, W) float tensor: resize, centre crop, to float in [0, 1], normalise (the
        steps of torchvision's ``weights.transforms()``, value for value; tested against them)."""
        return Normalized(self)

    def pixels(self) -> Pixels:
        """PIL RGB image -> resized, centre-cropped (3, H, W) uint8 tensor: the part of ``transform`` a reader runs;
        ``normalize`` finishes a batch of them with the same values, in one vectorised step instead of one per image
        (and a quarter of the bytes to pass where the readers are processes)."""
        return Pixels(tuple(self.resize_size), tuple(self.crop_size), self.interpolation)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """A (B, 3, H, W) uint8 batch of ``pixels`` -> what ``transform`` gives each image, bit for bit (to float,
        / 255, - mean, / std, in that order), on the batch's device."""
        mean = torch.tensor(self.mean, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(-1, 1, 1)
        return x.float().div_(255).sub_(mean).div_(std)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(3, H, W) of one preprocessed image."""
        h, w = (self.crop_size * 2)[:2]
        return 3, h, w

    def to_dict(self) -> dict:
        return {
            "resize_size": list(self.resize_size),
            "crop_size": list(self.crop_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "antialias": self.antialias,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            tuple(d["resize_size"]), tuple(d["crop_size"]), tuple(d["mean"]), tuple(d["std"]),
            d["interpolation"], bool(d.get("antialias", True)),
        )  # fmt: skip


class Backbone:
    """One model: its cuts (the first is the default), weights, preprocessing and frozen trunk.

    Subclasses set ``name`` and ``family`` and implement ``cuts``, ``resolve_weights``, ``preprocessing`` and
    ``load``; ``build`` freezes what ``load`` returns. Optional: ``describe`` (for `flowerfeat models`),
    ``classifier_cut`` and ``torchvision_state`` (export as the model's own state dict), ``whole_model`` (the
    textbook's full-network loop in `flowerfeat bench`)."""

    name: str = ""
    family: str = ""
    classifier_cut: str | None = None  # the cut whose rows the model's own last layer takes

    def cuts(self) -> dict[str, Cut]:
        raise NotImplementedError

    def resolve_weights(self, weights: str) -> WeightsInfo:
        """The ``--weights`` value (imagenet, none, a path) as a WeightsInfo, without loading or downloading."""
        raise NotImplementedError

    def preprocessing(self, weights: WeightsInfo) -> Preprocessing:
        raise NotImplementedError

    def load(self, weights: WeightsInfo, cut: str) -> nn.Module:
        """The model cut at ``cut``: (B, 3, H, W) -> (B, D), with ``weights`` loaded."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What `flowerfeat models` shows beside the cuts: gflops, imagenet_top1, weights_offline (None: unknown)."""
        return {}

    def torchvision_state(self, weights: WeightsInfo, head) -> dict | None:
        """The whole model's state dict with ``head`` (a LinearHead on ``classifier_cut``'s rows) as its last layer,
        loadable by ``torchvision.models.get_model(name, num_classes=C)``; None where the family cannot."""
        return None

    def split(self, weights: WeightsInfo, cut: str, with_top: bool = True) -> tuple[nn.Module, nn.Module | None]:
        """(bottom, top) of the model at a cut below its top, with ``weights``: the bottom maps images to the cut's
        activations flattened, (B, C*H*W); the top maps the activations (B, C, H, W) to the pooled rows its own
        classifier takes, (B, top_dim), from the weights' own values (refused in one line where they lack them).
        ``with_top=False``: the bottom alone, which needs only the bottom's weights (top None). Families with such
        cuts implement it."""
        raise FlowerfeatError(f"{self.name} at {cut}: no top to train above this cut; choose a cut that has one")

    def for_tracing(self, trunk: nn.Module, input_shape: tuple[int, int, int]) -> nn.Module:
        """``trunk`` as the ONNX exporter should trace it for images of ``input_shape``: where the family works out a
        shape at run time, that shape fixed (the same values, a graph without the arithmetic). Default: as it is."""
        return trunk

    def whole_model(self, weights: WeightsInfo, n_classes: int) -> tuple[nn.Module, nn.Module] | None:
        """(the whole network with a new last layer for ``n_classes``, that layer): the textbook's recipe; None where
        the family cannot."""
        return None

    @property
    def default_cut(self) -> str:
        return next(iter(self.cuts()))

    def cut(self, name: str | None) -> Cut:
        """The cut called ``name`` (None: the default); an unknown one is refused with the model's cuts."""
        cuts = self.cuts()
        if name is None:
            return next(iter(cuts.values()))
        if name not in cuts:
            raise FlowerfeatError(
                f"{self.name} has no layer {name!r}; choose one of: {', '.join(cuts)} (`flowerfeat models` lists them)"
            )
        return cuts[name]

    def build(self, weights: WeightsInfo, cut: str) -> nn.Module:
        """The frozen trunk: eval mode (dropout off), no gradients; for a cut below the top, the bottom of ``split``."""
        trunk = (self.split(weights, cut, False)[0] if self.cut(cut).trainable else self.load(weights, cut)).eval()
        trunk.requires_grad_(False)
        return trunk

    @property
    def folder_name(self) -> str:
        """The model's part of a cache folder name: ``timm:tf_efficientnet_lite0`` -> ``timm-tf_efficientnet_lite0``."""
        return safe_name(self.name.replace(":", "-").replace("/", "-"))


class Family:
    """Many models under one ``prefix`` (``"timm:"``; ``""`` for torchvision's zoo): ``names`` lists them (without the
    prefix), ``get`` makes one's Backbone (None: not a member). ``listed`` says whether `flowerfeat models` lists the
    members unasked (timm's thousands only when a pattern names the prefix); ``suggested`` names the members
    `flowerfeat compare` tries by default."""

    prefix: str = ""
    listed: bool = True

    def names(self) -> list[str]:
        raise NotImplementedError

    def get(self, name: str) -> Backbone | None:
        raise NotImplementedError

    def suggested(self) -> list[str]:
        return []

    def weights_dirs(self) -> list[str]:
        """The folders where the family's published weights land when downloaded (what `models` reports on)."""
        return []


class Flat(nn.Module):
    """A bottom: the model up to the cut, its activations flattened to rows, (B, C, H, W) -> (B, C*H*W)."""

    def __init__(self, *modules: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.body(x), 1)


def seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """``build()`` under a fixed seed: random init reproducible across processes, so resumed runs stay bit-identical."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def pooled_gflops(model: nn.Module, shape: tuple[int, int, int]) -> float:
    """G multiply-adds per image, counted by torch's FlopCounterMode over one image on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, *shape, device="meta"))
    return counter.get_total_flops() / 2e9


# ---------------------------------------------------------------------------------------------------------
# The registry: exact names first, then families by prefix (the longest that fits).

_MODELS: dict[str, Callable[[], Backbone]] = {}
_SUGGESTED: list[str] = []  # registered models that compare tries by default
_FAMILIES: dict[str, Family] = {}
_BUILT: dict[str, Backbone] = {}


def register(name: str, factory: Callable[[], Backbone], suggested: bool = False) -> None:
    """Make ``name`` choosable (``--model name``); ``factory()`` builds its Backbone on first use; ``suggested``:
    `flowerfeat compare` tries it by default."""
    _MODELS[name] = factory
    _BUILT.pop(name, None)
    if suggested and name not in _SUGGESTED:
        _SUGGESTED.append(name)


def unregister(name: str) -> None:
    _MODELS.pop(name, None)
    _BUILT.pop(name, None)
    if name in _SUGGESTED:
        _SUGGESTED.remove(name)


def register_family(family: Family) -> None:
    """Make every name ``family.get`` knows choosable, as ``family.prefix + name``."""
    _FAMILIES[family.prefix] = family
    for name in [n for n in _BUILT if n.startswith(family.prefix) and n not in _MODELS]:
        del _BUILT[name]


def unregister_family(prefix: str) -> None:
    _FAMILIES.pop(prefix, None)
    for name in [n for n in _BUILT if n.startswith(prefix) and n not in _MODELS] if prefix else []:
        del _BUILT[name]


def _family_for(name: str) -> Family | None:
    fits = [p for p in _FAMILIES if name.startswith(p)]
    return _FAMILIES[max(fits, key=len)] if fits else None


def get_backbone(name: str) -> Backbone:
    """The Backbone for ``--model name``; an unknown name is refused with the close matches (in every family)."""
    if name in _BUILT:
        return _BUILT[name]
    if name in _MODELS:
        backbone = _MODELS[name]()
    else:
        family = _family_for(name)
        backbone = family.get(name[len(family.prefix) :]) if family is not None else None
        if backbone is None:
            raise FlowerfeatError(f"unknown model {name!r}; {_close_matches(name)}")
    _BUILT[name] = backbone
    return backbone


def _close_matches(name: str) -> str:
    """``close matches: ...`` among every name, a bare name also against each family's members without prefix."""
    candidates = {n: n for n in _MODELS}
    for prefix, family in _FAMILIES.items():
        try:
            members = family.names()
        except FlowerfeatError:  # a family whose extra is not installed
            continue
        for member in members:
            candidates.setdefault(prefix + member, prefix + member)
            candidates.setdefault(member, prefix + member)
    close = difflib.get_close_matches(name, list(candidates), n=4, cutoff=0.6)
    found = list(dict.fromkeys(candidates[c] for c in close))
    return f"close matches: {', '.join(found)}" if found else "`flowerfeat models` lists them"


def list_models(pattern: str | None = None) -> Iterator[str]:
    """Every choosable name matching the shell ``pattern`` (all when None): the registered models, then each listed
    family's members; a family that is not listed unasked (timm's) when the pattern starts with its prefix."""
    seen = set()
    for name in _MODELS:
        if pattern is None or fnmatch.fnmatch(name, pattern):
            seen.add(name)
            yield name
    for prefix, family in _FAMILIES.items():
        asked = bool(prefix) and pattern is not None and pattern.startswith(prefix)
        if not (family.listed or asked):
            continue
        for member in family.names():
            name = prefix + member
            if name not in seen and (pattern is None or fnmatch.fnmatch(name, pattern)):
                seen.add(name)
                yield name


def suggested_models() -> list[str]:
    """What `flowerfeat compare` tries unasked: the default model, the suggested registered models, then each
    family's suggestions (one small member of the families users reach for next)."""
    names = [DEFAULT_MODEL, *_SUGGESTED]
    for family in _FAMILIES.values():
        names += [family.prefix + n for n in family.suggested()]
    return list(dict.fromkeys(names))


def weights_dirs() -> list[str]:
    """Every family's download folders: when one changes, what `models` remembered about offline weights is stale."""
    return sorted({d for family in _FAMILIES.values() for d in family.weights_dirs()})


def parse_choice(choice: str) -> tuple[str, str | None]:
    """``MODEL@CUT`` -> (model, cut); a plain model name -> (model, None)."""
    model, _, cut = choice.partition("@")
    return model, cut or None


def _register_builtin() -> None:
    from flowerfeat.backbones import timm as timm_family
    from flowerfeat.backbones import torchvision as tv_family
    from flowerfeat.backbones.vgg import VGG16

    register("vgg16", VGG16)
    register_family(tv_family.Family())
    register_family(timm_family.Family())


_register_builtin()
