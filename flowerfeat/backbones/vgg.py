"""VGG16, the textbook's trunk: cut at fc7 (the default), fc6, pool5 or pool5-gap; conv-only state dicts serve pool5.
Below the top: pool5 (fc6 and fc7 above it) and pool4 (the conv5 block above it), for `fit-head --train-top`."""

from __future__ import annotations

import torch
from torch import nn

from flowerfeat.backbones import Backbone, Cut, Flat, Preprocessing, seeded, stage_cut
from flowerfeat.errors import FlowerfeatError
from flowerfeat.weights import DOWNLOAD_ERRORS, WeightsInfo, check_keys, download_error, load_state_dict, resolve_local

# Number of VGG16 classifier modules each cut keeps: classifier[:5] ends after fc7's ReLU, [:2] after fc6's.
_CLASSIFIER_KEEP = {"fc7": 5, "fc6": 2, "pool5": 0, "pool5-gap": 0}
POOL4 = 24  # features[:24] ends with conv4's max pool; features[24:31] is the conv5 block and pool5
# the head's dropout above the trained conv5 block and its global average pool (docs/heads.md has the measurement)
POOL4_DROPOUT = 0.2
# VGG16 has no BatchNorm to steady its conv5 block: at fit_top's 0.3 of the new layer's rate it diverged on one seed
# of three (seed 1: loss 4.8 at the schedule's peak, 22 % on the test photos); it trains at a tenth (3e-4, the rate
# the trained-top recipe was first measured with)
POOL4_LR_RATIO = 0.1
# Positions of the 13 Conv2d modules in torchvision's vgg16().features.
CONV_IDX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


class Trunk(nn.Module):
    """VGG16 up to the cut layer: (B, 3, 224, 224) -> (B, D)."""

    def __init__(self, vgg: nn.Module, layer: str):
        super().__init__()
        self.layer = layer
        self.features = vgg.features
        self.avgpool = vgg.avgpool
        keep = _CLASSIFIER_KEEP[layer]
        self.classifier = vgg.classifier[:keep] if keep else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 512, 7, 7)
        if self.layer == "pool5-gap":
            return x.float().mean(dim=(2, 3))  # (B, 512)
        x = torch.flatten(self.avgpool(x), 1)  # (B, 25088), channel-major as torchvision flattens it
        return self.classifier(x)  # (B, 4096) for fc6/fc7


def required_keys(layer: str) -> list[str]:
    """State-dict keys the cut needs: the 13 conv layers (pool4: the first 10), plus fc6 (and fc7) for the classifier
    cuts."""
    convs = [i for i in CONV_IDX if layer != "pool4" or i < POOL4]
    keys = [f"features.{i}.{p}" for i in convs for p in ("weight", "bias")]
    fcs = {"fc7": (0, 3), "fc6": (0,)}.get(layer, ())
    return keys + [f"classifier.{i}.{p}" for i in fcs for p in ("weight", "bias")]


class VGG16(Backbone):
    """torchvision's VGG16 with the textbook's cuts; ``imagenet`` = IMAGENET1K_V1 (IMAGENET1K_FEATURES has no
    usable classifier: NaN)."""

    name = "vgg16"
    family = "torchvision"
    classifier_cut = "fc7"  # classifier[6] takes fc7's rows

    def cuts(self) -> dict[str, Cut]:
        return {
            "fc7": Cut("fc7", 4096, 0.5, "after fc7's ReLU: classifier[6]'s input, the textbook's cut"),
            "fc6": Cut("fc6", 4096, 0.5, "after fc6's ReLU"),
            "pool5": Cut("pool5", 512 * 7 * 7, 0.0, "the last conv block's 512 x 7 x 7 map, flattened; trains fc6, fc7",
                         top="classifier[:6] (fc6 and fc7 with their dropout)", shape=(512, 7, 7), top_dim=4096,
                         top_dropout=0.5, top_bf16=True),  # fmt: skip
            "pool5-gap": Cut("pool5-gap", 512, 0.0, "pool5 averaged over its 7 x 7 positions"),
            "pool4": stage_cut("pool4", (512, 14, 14),
                               "features[24:31] (the conv5 block and pool5), global average pool", 512, POOL4_DROPOUT,
                               "conv4's pooled 512 x 14 x 14 map; trains the conv5 block", top_bf16=True,
                               top_lr_ratio=POOL4_LR_RATIO),
        }

    @staticmethod
    def _enum():
        from torchvision.models import VGG16_Weights

        return VGG16_Weights.IMAGENET1K_V1

    def resolve_weights(self, weights: str) -> WeightsInfo:
        local = resolve_local("DEFAULT" if weights == "IMAGENET1K_V1" else weights, self.name)
        if local is not None:
            return local
        w = self._enum()
        return WeightsInfo("hub", f"VGG16_Weights.{w.name}", url=w.url, source="torchvision")

    def preprocessing(self, weights: WeightsInfo) -> Preprocessing:
        return Preprocessing.of(self._enum().transforms())  # the same for every VGG16 weights file

    def describe(self) -> dict:
        from flowerfeat.backbones.torchvision import hub_file_present

        w = self._enum()
        return {
            "gflops": w.meta["_ops"],
            "imagenet_top1": w.meta["_metrics"]["ImageNet-1K"]["acc@1"],
            "weights_offline": hub_file_present(w.url),
        }

    def load_vgg16(self, weights: WeightsInfo, layer: str) -> nn.Module:
        """torchvision's VGG16 with the weights the cut needs (a conv-only file serves pool5 and pool5-gap)."""
        from torchvision.models import vgg16

        if weights.kind == "none":
            return seeded(lambda: vgg16(weights=None))
        if weights.kind == "hub":
            try:
                return vgg16(weights=self._enum(), progress=False)
            except DOWNLOAD_ERRORS as e:
                raise download_error(self.name, weights.url, e, f"{torch.hub.get_dir()}/checkpoints/") from None
        state = load_state_dict(weights.path, self.name)
        cuts = self.cuts()
        served = [c for c in cuts if all(k in state for k in required_keys(c))]
        if layer not in served and served:  # e.g. a conv-only file (features.*) asked for the default fc7
            missing = next(k for k in required_keys(layer) if k not in state)
            pick = min((c for c in served if not cuts[c].shape), key=lambda c: cuts[c].dim, default=served[0])
            raise FlowerfeatError(
                f"{weights.path}: has the weights of --layer {', '.join(served)} but not of {layer} (no {missing}); "
                f"pass --layer {pick}, or a file with {layer}'s weights"
            )
        model = seeded(lambda: vgg16(weights=None))
        own = model.state_dict()
        check_keys(state, {k: own[k] for k in required_keys(layer)}, weights.path, self.name, layer)
        model.load_state_dict({k: state[k] for k in required_keys(layer)}, strict=False)
        return model

    def load(self, weights: WeightsInfo, cut: str) -> nn.Module:
        return Trunk(self.load_vgg16(weights, cut), cut)

    def split(self, weights: WeightsInfo, cut: str, with_top: bool = True) -> tuple[nn.Module, nn.Module | None]:
        if cut not in ("pool4", "pool5"):
            return super().split(weights, cut, with_top)
        needs = cut if not with_top else "pool5" if cut == "pool4" else "fc7"
        if with_top and cut == "pool5" and weights.kind == "file":
            state = load_state_dict(weights.path, self.name)
            if not all(k in state for k in required_keys("fc7")):
                raise FlowerfeatError(
                    f"{weights.path}: has no fc6/fc7 weights (classifier.0, classifier.3), which the top above pool5 "
                    "starts from; train the conv5 block above pool4 (--layer pool4), or pass VGG16's full weights"
                )
        vgg = self.load_vgg16(weights, needs)
        if cut == "pool5":
            top = nn.Sequential(nn.Flatten(), *vgg.classifier[:6]) if with_top else None
            return Trunk(vgg, "pool5"), top
        top = nn.Sequential(*vgg.features[POOL4:], nn.AdaptiveAvgPool2d(1), nn.Flatten()) if with_top else None
        return Flat(*vgg.features[:POOL4]), top

    def whole_model(self, weights: WeightsInfo, n_classes: int) -> tuple[nn.Module, nn.Module]:
        """The textbook's network: VGG16 with ``classifier[6]`` replaced (a conv-only file: fc6/fc7 stay random)."""
        vgg = self.load_vgg16(weights, "pool5" if weights.kind == "file" else "fc7")
        vgg.classifier[6] = nn.Linear(4096, n_classes)
        return vgg, vgg.classifier[6]

    def torchvision_state(self, weights: WeightsInfo, head) -> dict:
        state = self.load_vgg16(weights, "fc7").state_dict()
        state["classifier.6.weight"] = head.weight.detach().clone()  # (C, 4096)
        state["classifier.6.bias"] = head.bias.detach().clone()  # (C,)
        return state
