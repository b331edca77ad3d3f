"""Every torchvision classification model by its name: cut at the pooled pre-logits (the input of its last Linear),
and for CNNs whose classifier does more than dropout, also at the last stage's pooled map."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from flowerfeat.backbones import Backbone, Cut, Family as BaseFamily, Flat, Preprocessing, seeded, stage_cut
from flowerfeat.errors import FlowerfeatError
from flowerfeat.weights import DOWNLOAD_ERRORS, WeightsInfo, check_keys, download_error, load_state_dict, resolve_local


def hub_file_present(url: str) -> bool:
    """Whether torchvision's download of ``url`` is already in torch's hub cache (then it loads offline)."""
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)).is_file()


class Family(BaseFamily):
    """torchvision's classification zoo (``torchvision.models.list_models(module=torchvision.models)``), by bare
    name."""

    prefix, listed = "", True

    def suggested(self) -> list[str]:
        return ["resnet50", "efficientnet_b0", "convnext_tiny"]  # one small member of each family users reach for

    def weights_dirs(self) -> list[str]:
        return [str(Path(torch.hub.get_dir()) / "checkpoints")]

    def names(self) -> list[str]:
        import torchvision

        return torchvision.models.list_models(module=torchvision.models)

    def get(self, name: str) -> Backbone | None:
        return TorchvisionModel(name) if name in self.names() else None


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear, float]:
    """(name, module, dropout just before it) of the model's classification layer: its last nn.Linear."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise FlowerfeatError(f"{type(model).__name__}: no Linear classifier to cut before; choose another model")
    name, linear = linears[-1]
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    dropout = 0.0
    if isinstance(parent, nn.Sequential):
        children = list(parent.named_children())
        at = [n for n, _ in children].index(child)
        if at and isinstance(children[at - 1][1], nn.Dropout):
            dropout = float(children[at - 1][1].p)
    return name, linear, dropout


def _has_pool_cut(model: nn.Module) -> bool:
    """A CNN (``features`` then a global ``avgpool``) whose classifier does more than dropout before its Linear."""
    pool = getattr(model, "avgpool", None)
    classifier = getattr(model, "classifier", None)
    if not (hasattr(model, "features") and isinstance(pool, nn.AdaptiveAvgPool2d) and classifier is not None):
        return False
    if pool.output_size not in (1, (1, 1)):
        return False
    return any(not isinstance(m, (nn.Dropout, nn.Flatten, nn.Linear)) for m in classifier.children())


def _has_features(model: nn.Module) -> bool:
    return hasattr(model, "features") and isinstance(getattr(model, "avgpool", None), nn.AdaptiveAvgPool2d)


class _Top(nn.Module):
    """A features-CNN above a cut: its last stages, the pool, and its classifier up to its last Linear (a trailing
    dropout left to the head): (B, C, H, W) -> the rows the last Linear takes."""

    def __init__(self, model: nn.Module, start: int):
        super().__init__()
        self.features, self.avgpool = model.features[start:], model.avgpool
        pre = list(model.classifier.children())[:-1]
        while pre and isinstance(pre[-1], nn.Dropout):
            pre.pop()
        first = next((i for i, p in enumerate(pre) if isinstance(p, nn.Linear)), None)
        if first is not None and not any(isinstance(p, nn.Flatten) for p in pre[:first]):
            pre.insert(first, nn.Flatten())  # MobileNetV3's or AlexNet's Linear takes the flattened pool
        self.pre = nn.Sequential(*pre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pre(self.avgpool(self.features(x))), 1)


class PoolTrunk(nn.Module):
    """features -> global average pool -> flatten: the last stage's pooled map."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.features, self.avgpool = model.features, model.avgpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)


class TorchvisionModel(Backbone):
    """A torchvision model; ``imagenet`` = its weights enum's DEFAULT, ``--weights PATH`` = its state dict."""

    family = "torchvision"
    classifier_cut = "pre-logits"  # the input of its last Linear

    def __init__(self, name: str):
        self.name = name

    @functools.cached_property
    def _enum(self):
        from torchvision.models import get_model_weights

        return get_model_weights(self.name).DEFAULT

    def _random(self) -> nn.Module:
        from torchvision.models import get_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # inception/googlenet's note on their init
            return seeded(lambda: get_model(self.name, weights=None))

    @functools.cached_property
    def _meta(self) -> nn.Module:
        """The model built on the meta device (fast, no weights); a model that cannot be built there (RegNet computes
        its widths with tensors) is built on the CPU."""
        from torchvision.models import get_model

        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return get_model(self.name, weights=None)
        except (NotImplementedError, RuntimeError):
            return self._random()

    @functools.cached_property
    def _shape(self) -> dict:
        """The classifier's name, input dimension and dropout, read off the model."""
        model = self._meta
        name, linear, dropout = _last_linear(model)
        shape = {"linear": name, "dim": linear.in_features, "dropout": dropout, "pool": None}
        if _has_pool_cut(model):  # the classifier's first module takes the pooled map: a Linear or a norm
            first = next(iter(model.classifier.children()))
            shape["pool"] = first.in_features if isinstance(first, nn.Linear) else int(first.normalized_shape[0])
        return shape

    def cuts(self) -> dict[str, Cut]:
        s = self._shape
        cuts = {"pre-logits": Cut("pre-logits", s["dim"], s["dropout"], f"the input of {s['linear']}, pooled")}
        if s["pool"]:
            cuts["pool"] = Cut("pool", s["pool"], 0.0, "the last stage's map, global-average pooled")
        stage = self._stage
        if stage:
            about = f"{stage['at']}'s output {' x '.join(map(str, stage['shape']))}; trains {stage['top']}"
            cuts[stage["at"]] = stage_cut(stage["at"], stage["shape"], stage["top"], s["dim"], s["dropout"], about)
        return cuts

    @functools.cached_property
    def _stage(self) -> dict | None:
        """The input of the last stage, for a ResNet (layer3's output; layer4 above it) or a CNN of ``features``
        stages (the output just before the last resolution's stages: EfficientNet, MobileNetV3, ConvNeXt); None for
        the other models."""
        m, shape = self._meta, self.preprocessing(WeightsInfo("none", "none")).input_shape
        x = torch.empty(1, *shape, device=next(m.parameters()).device)
        with torch.no_grad():
            if all(hasattr(m, a) for a in ("layer3", "layer4", "avgpool", "fc")):
                for part in (m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3):
                    x = part(x)
                return {"at": "layer3", "shape": tuple(x.shape[1:]), "top": "layer4 and its pool", "start": None}
            if not (_has_features(m) and isinstance(m.classifier, nn.Sequential)):
                return None
            shapes = [tuple((x := f(x)).shape[1:]) for f in m.features]
        start = next(i for i, s in enumerate(shapes) if s[1:] == shapes[-1][1:])  # the last resolution's first stage
        if start < 2:
            return None
        return {"at": f"features.{start - 1}", "shape": shapes[start - 1], "start": start,
                "top": f"features[{start}:] (the last resolution's stages), the pool and the classifier before its "
                       "last layer"}  # fmt: skip

    def split(self, weights: WeightsInfo, cut: str, with_top: bool = True) -> tuple[nn.Module, nn.Module | None]:
        stage = self._stage
        if not stage or cut != stage["at"]:
            return super().split(weights, cut, with_top)
        m = self._full(weights, "pre-logits")
        if stage["start"] is None:  # a ResNet
            bottom = Flat(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3)
            return bottom, nn.Sequential(m.layer4, m.avgpool, nn.Flatten()) if with_top else None
        bottom = Flat(*m.features[: stage["start"]])
        return bottom, _Top(m, stage["start"]) if with_top else None

    def resolve_weights(self, weights: str) -> WeightsInfo:
        local = resolve_local(weights, self.name)
        if local is not None:
            return local
        w = self._enum
        return WeightsInfo("hub", f"{type(w).__name__}.{w.name}", url=w.url, source="torchvision")

    def preprocessing(self, weights: WeightsInfo) -> Preprocessing:
        return Preprocessing.of(self._enum.transforms())  # a file or random init: the DEFAULT weights' transform

    def describe(self) -> dict:
        meta = self._enum.meta
        return {
            "gflops": meta.get("_ops"),
            "imagenet_top1": meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1"),
            "weights_offline": hub_file_present(self._enum.url),
        }

    def _full(self, weights: WeightsInfo, cut: str) -> nn.Module:
        """The whole model with ``weights``; for a file, every tensor the cut uses is checked first."""
        from torchvision.models import get_model

        if weights.kind == "hub":
            try:
                return get_model(self.name, weights=self._enum, progress=False)
            except DOWNLOAD_ERRORS as e:
                raise download_error(self.name, weights.url, e, f"{torch.hub.get_dir()}/checkpoints/") from None
        model = self._random()
        if weights.kind == "file":
            state = load_state_dict(weights.path, self.name)
            own = self._cut(model, cut).state_dict()
            check_keys(state, own, weights.path, self.name, cut)
            model.load_state_dict({k: state[k] for k in own}, strict=False)
        return model

    def _cut(self, model: nn.Module, cut: str) -> nn.Module:
        if cut == "pool":
            return PoolTrunk(model)
        model.set_submodule(self._shape["linear"], nn.Identity())  # its input is the pre-logits
        return model

    def load(self, weights: WeightsInfo, cut: str) -> nn.Module:
        return self._cut(self._full(weights, cut), cut)

    def whole_model(self, weights: WeightsInfo, n_classes: int) -> tuple[nn.Module, nn.Module]:
        model = self._full(weights, self.classifier_cut)
        old = model.get_submodule(self._shape["linear"])
        new = nn.Linear(old.in_features, n_classes)
        model.set_submodule(self._shape["linear"], new)
        return model, new

    def torchvision_state(self, weights: WeightsInfo, head) -> dict:
        state = self._full(weights, self.classifier_cut).state_dict()
        state[f"{self._shape['linear']}.weight"] = head.weight.detach().clone()
        state[f"{self._shape['linear']}.bias"] = head.bias.detach().clone()
        return state
