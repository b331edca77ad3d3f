"""Backbones as plug-ins: a registry of models, each naming its cuts, preprocessing, weights and export.

A ``Backbone`` is one model: ``vgg16`` (the textbook's, with its four cuts), any torchvision classification model by
its name (``resnet50``, ``vit_b_16``, ...), or ``timm:<name>`` (the [timm] extra). Adding a family is one module and
one ``register_family``; adding a single model, one ``register``::

    from flowerfeat import backbones
    backbones.register("my-net", MyBackbone)   # a Backbone subclass, built on first use
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from flowerfeat.errors import FlowerfeatError
from flowerfeat.weights import WeightsInfo, safe_name

DEFAULT_MODEL = "vgg16"


@dataclass(frozen=True)
class Cut:
    """Where a model is cut: its name (``--layer``), the row dimension, and the dropout the model's own classifier
    applies to that output (the head's default dropout)."""

    name: str
    dim: int
    dropout: float = 0.0
    about: str = ""  # one line for `flowerfeat models`


@dataclass(frozen=True)
class Preprocessing:
    """The weights' own eval transform (torchvision's ``weights.transforms()``, timm's data config), as data."""

    resize_size: tuple[int, ...]  # (s,): the shorter side to s; (h, w): squashed to h x w
    crop_size: tuple[int, ...]  # (s,) or (h, w), centre crop
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # torchvision's InterpolationMode value: bilinear, bicubic, ...
    antialias: bool = True

    @classmethod
    def of(cls, t) -> Preprocessing:
        """From torchvision's ``ImageClassification`` preset (what ``weights.transforms()`` returns)."""
        return cls(
            tuple(t.resize_size), tuple(t.crop_size), tuple(t.mean), tuple(t.std), t.interpolation.value, t.antialias
        )

    def transform(self):
        """PIL RGB image -> normalised (3, H, W) float tensor: torchvision's ImageClassification with these values."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms._presets import ImageClassification

        return ImageClassification(
            crop_size=list(self.crop_size) if len(self.crop_size) > 1 else self.crop_size[0],
            resize_size=list(self.resize_size) if len(self.resize_size) > 1 else self.resize_size[0],
            mean=self.mean,
            std=self.std,
            interpolation=InterpolationMode(self.interpolation),
            antialias=self.antialias,
        )

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
    ``load``; ``build`` freezes what ``load`` returns."""

    name: str = ""
    family: str = ""

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

    def torchvision_state(self, weights: WeightsInfo, cut: str, head) -> dict | None:
        """The whole model's torchvision state dict with ``head`` as its last layer, where the cut is the input of
        that layer (``torchvision.models.get_model(name, num_classes=C)`` loads it); None where it is not."""
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
        """The frozen trunk: eval mode (dropout off), no gradients."""
        trunk = self.load(weights, cut).eval()
        trunk.requires_grad_(False)
        return trunk

    @property
    def folder_name(self) -> str:
        """The model's part of a cache folder name: ``timm:tf_efficientnet_lite0`` -> ``timm-tf_efficientnet_lite0``."""
        return safe_name(self.name.replace(":", "-").replace("/", "-"))


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
# The registry: exact names first, then families by prefix ("timm:"; "" for torchvision's zoo).

_MODELS: dict[str, Callable[[], Backbone]] = {}
_FAMILIES: dict[str, object] = {}  # prefix -> a family: .names() -> list[str], .get(name) -> Backbone | None
_BUILT: dict[str, Backbone] = {}


def register(name: str, factory: Callable[[], Backbone]) -> None:
    """Make ``name`` choosable (``--model name``); ``factory()`` builds its Backbone on first use."""
    _MODELS[name] = factory
    _BUILT.pop(name, None)


def unregister(name: str) -> None:
    _MODELS.pop(name, None)
    _BUILT.pop(name, None)


def register_family(prefix: str, family) -> None:
    """Make every name ``family.get`` knows choosable, under ``prefix`` (``timm:``) or none (``""``)."""
    _FAMILIES[prefix] = family


def _family_for(name: str):
    for prefix in sorted(_FAMILIES, key=len, reverse=True):  # the longest prefix that fits
        if name.startswith(prefix):
            return prefix, _FAMILIES[prefix]
    return None, None


def get_backbone(name: str) -> Backbone:
    """The Backbone for ``--model name``; an unknown name is refused with the close matches."""
    if name in _BUILT:
        return _BUILT[name]
    if name in _MODELS:
        backbone = _MODELS[name]()
    else:
        prefix, family = _family_for(name)
        backbone = family.get(name[len(prefix) :]) if family is not None else None
        if backbone is None:
            close = difflib.get_close_matches(name, list_models(prefix or ""), n=4, cutoff=0.6)
            hint = f"close matches: {', '.join(close)}" if close else "`flowerfeat models` lists them"
            raise FlowerfeatError(f"unknown model {name!r}; {hint}")
    _BUILT[name] = backbone
    return backbone


def list_models(prefix: str = "") -> list[str]:
    """Every choosable name: the registered models, then each family's (``prefix`` "timm:" for timm's)."""
    names = list(_MODELS) if not prefix else []
    for p, family in _FAMILIES.items():
        if p == prefix:
            names += [p + n for n in family.names() if p + n not in _MODELS]
    return names


def parse_choice(choice: str) -> tuple[str, str | None]:
    """``MODEL@CUT`` -> (model, cut); a plain model name -> (model, None)."""
    model, _, cut = choice.partition("@")
    return model, cut or None


def gflops_text(g: float | None) -> str:
    return "?" if g is None or not math.isfinite(g) else f"{g:.2f}"


def _register_builtin() -> None:
    from flowerfeat.backbones import timm as timm_family
    from flowerfeat.backbones import torchvision as tv_family
    from flowerfeat.backbones.vgg import VGG16

    register("vgg16", VGG16)
    register_family("", tv_family.Family())
    register_family("timm:", timm_family.Family())


_register_builtin()
