"""timm's models as ``timm:<name>`` (the [timm] extra): pooled pre-logits (``num_classes=0``), timm's data config,
weights from the Hugging Face hub when online or a local timm state dict."""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
from torch import nn

from flowerfeat.backbones import Backbone, Cut, Preprocessing, seeded
from flowerfeat.errors import FlowerfeatError
from flowerfeat.weights import DOWNLOAD_ERRORS, WeightsInfo, check_keys, download_error, load_state_dict, resolve_local

INSTALL = "pip install 'flowerfeat[timm]'"


def _timm(name: str = "<name>"):
    if importlib.util.find_spec("timm") is None:
        raise FlowerfeatError(f"--model timm:{name} needs timm; install the extra: {INSTALL}")
    import timm

    return timm


class Family:
    """Every architecture ``timm.list_models()`` knows."""

    def names(self) -> list[str]:
        return _timm().list_models() if importlib.util.find_spec("timm") else []

    def get(self, name: str) -> Backbone | None:
        return TimmModel(name) if _timm(name).is_model(name) else None


class TimmModel(Backbone):
    family = "timm"

    def __init__(self, arch: str):
        self.arch, self.name = arch, f"timm:{arch}"

    def _create(self, pretrained: bool = False) -> nn.Module:
        return _timm().create_model(self.arch, pretrained=pretrained, num_classes=0)

    @functools.cached_property
    def _meta_model(self) -> nn.Module:
        """The model on the meta device: its sizes and config without allocating or initialising weights."""
        with torch.device("meta"):
            return self._create()

    @property
    def _cfg(self) -> dict:
        return self._meta_model.pretrained_cfg

    def cuts(self) -> dict[str, Cut]:
        m = self._meta_model
        dim = int(getattr(m, "head_hidden_size", None) or m.num_features)
        dropout = float(getattr(m, "drop_rate", 0.0) or 0.0)  # what timm drops out before its classifier
        return {"pre-logits": Cut("pre-logits", dim, dropout, "pooled pre-logits (num_classes=0)")}

    def resolve_weights(self, weights: str) -> WeightsInfo:
        local = resolve_local(weights, self.name)
        if local is not None:
            return local
        cfg = self._cfg
        tag = cfg.get("hf_hub_id") or f"{self.arch}.{cfg.get('tag', '')}"
        return WeightsInfo("hub", tag, url=cfg.get("hf_hub_id") or cfg.get("url", ""), source="timm")

    def preprocessing(self, weights: WeightsInfo) -> Preprocessing:
        """timm's data config for the model (``resolve_model_data_config``), in torchvision's terms."""
        cfg = _timm().data.resolve_model_data_config(self._meta_model)
        crop = tuple(cfg["input_size"][1:])
        mode = cfg.get("crop_mode", "center")
        if mode not in ("center", "squash"):
            raise FlowerfeatError(f"{self.name}: crop mode {mode!r} is not supported; choose another model")
        scale = [math.floor(s / cfg["crop_pct"]) for s in crop]
        # timm resizes the shorter side (center) to the scaled crop, or both sides (squash)
        resize = (scale[0],) if mode == "center" and crop[0] == crop[1] else tuple(scale)
        return Preprocessing(
            resize, crop if crop[0] != crop[1] else (crop[0],), tuple(cfg["mean"]), tuple(cfg["std"]),
            cfg["interpolation"],
        )  # fmt: skip

    def describe(self) -> dict:
        from flowerfeat.backbones import pooled_gflops

        hub = self._cfg.get("hf_hub_id")
        offline = None
        if hub:
            from huggingface_hub import try_to_load_from_cache

            offline = any(
                isinstance(try_to_load_from_cache(hub, f), str) for f in ("model.safetensors", "pytorch_model.bin")
            )
        shape = self.preprocessing(WeightsInfo("none", "none")).input_shape
        return {"gflops": pooled_gflops(self._meta_model, shape), "imagenet_top1": None, "weights_offline": offline}

    def load(self, weights: WeightsInfo, cut: str) -> nn.Module:
        if weights.kind == "hub":
            try:
                return self._create(pretrained=True)
            except DOWNLOAD_ERRORS as e:
                raise download_error(self.name, weights.url, e, "the Hugging Face hub cache (HF_HOME)") from None
        model = seeded(self._create)
        if weights.kind == "file":
            state = load_state_dict(weights.path, self.name)
            own = model.state_dict()  # the classifier is gone (num_classes=0): its keys are not needed
            check_keys(state, own, weights.path, self.name, cut)
            model.load_state_dict({k: state[k] for k in own})
        return model
