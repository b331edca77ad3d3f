"""timm's models as ``timm:<name>`` (the [timm] extra): pooled pre-logits (``num_classes=0``), timm's data config,
weights from the Hugging Face hub when online or a local timm state dict."""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn

from flowerfeat.backbones import Backbone, Cut, Family as BaseFamily, Flat, Preprocessing, seeded, stage_cut
from flowerfeat.errors import FlowerfeatError
from flowerfeat.weights import DOWNLOAD_ERRORS, WeightsInfo, check_keys, download_error, load_state_dict, resolve_local

INSTALL = "pip install 'flowerfeat[timm]'"
# the dropout EfficientNet's training recipe puts before its classifier (timm creates the model without it): the
# head's when the top trains, as in the run that measured the trained top (docs/heads.md)
TOP_DROPOUT = 0.2


def _timm(name: str = "<name>"):
    if importlib.util.find_spec("timm") is None:
        raise FlowerfeatError(f"--model timm:{name} needs timm; install the extra: {INSTALL}")
    import timm

    return timm


class Family(BaseFamily):
    """Every architecture ``timm.list_models()`` knows, as ``timm:<name>``; listed by `flowerfeat models` when a
    pattern asks for them (``'timm:*lite*'``): there are over a thousand."""

    prefix, listed = "timm:", False

    def suggested(self) -> list[str]:
        # 0.39 G multiply-adds, ImageNet-trained: the small model users reach for; and its top trained on the cache
        return ["tf_efficientnet_lite0", "tf_efficientnet_lite0@blocks.5+top"]

    def weights_dirs(self) -> list[str]:
        if importlib.util.find_spec("huggingface_hub") is None:
            return []
        from huggingface_hub import constants

        return [str(constants.HF_HUB_CACHE)]

    def names(self) -> list[str]:
        return _timm().list_models() if importlib.util.find_spec("timm") else []

    def get(self, name: str) -> Backbone | None:
        return TimmModel(name) if _timm(name).is_model(name) else None


def _input_size(sizes: dict, name: str, _module, args) -> None:
    sizes[name] = tuple(args[0].shape[-2:])


class TimmModel(Backbone):
    family = "timm"

    def __init__(self, arch: str):
        self.arch, self.name = arch, f"timm:{arch}"

    def _create(self, pretrained: bool = False) -> nn.Module:
        return _timm().create_model(self.arch, pretrained=pretrained, num_classes=0)

    def for_tracing(self, trunk: nn.Module, input_shape: tuple[int, int, int]) -> nn.Module:
        """TensorFlow-style 'same' padding (``Conv2dSame``, the tf_ models) worked out for ``input_shape`` once: a
        fixed ``ZeroPad2d`` before a plain convolution. Traced as it is, each such convolution becomes a dozen shape
        operators that keep ONNX Runtime from fusing it (Lite0: 628 nodes and ~140 images/s instead of 278 and ~230)."""
        import copy

        from timm.layers import Conv2dSame
        from timm.layers.padding import pad_same_arg

        names = [n for n, m in trunk.named_modules() if isinstance(m, Conv2dSame)]
        if not names:
            return trunk
        trunk, sizes = copy.deepcopy(trunk), {}
        hooks = [trunk.get_submodule(n).register_forward_pre_hook(functools.partial(_input_size, sizes, n))
                 for n in names]  # fmt: skip
        with torch.no_grad():
            trunk(torch.zeros(1, *input_shape))
        for h in hooks:
            h.remove()
        for name in names:
            same = trunk.get_submodule(name)
            conv = nn.Conv2d(same.in_channels, same.out_channels, same.kernel_size, same.stride, 0, same.dilation,
                             same.groups, same.bias is not None)  # fmt: skip
            conv.load_state_dict(same.state_dict())
            pad = pad_same_arg(list(sizes[name]), same.weight.shape[-2:], same.stride, same.dilation)
            parent, _, leaf = name.rpartition(".")
            setattr(trunk.get_submodule(parent), leaf, nn.Sequential(nn.ZeroPad2d(pad), conv).eval())
        return trunk.requires_grad_(False)

    @functools.cached_property
    def _meta_model(self) -> nn.Module:
        """The model on the meta device: its sizes and config without allocating or initialising weights."""
        with torch.device("meta"):
            return self._create()

    @property
    def _cfg(self) -> dict:
        return self._meta_model.pretrained_cfg

    def cuts(self) -> dict[str, Cut]:
        return dict(self._cuts)

    @functools.cached_property
    def _cuts(self) -> dict[str, Cut]:
        """Worked out once per model: the stages' shapes take a pass of the meta model (0.2 s for Lite0)."""
        m = self._meta_model
        dim = int(getattr(m, "head_hidden_size", None) or m.num_features)
        dropout = float(getattr(m, "drop_rate", 0.0) or 0.0)  # what timm drops out before its classifier
        cuts = {"pre-logits": Cut("pre-logits", dim, dropout, "pooled pre-logits (num_classes=0)")}
        return cuts | self._stage_cuts(dim)

    def _stage_cuts(self, dim: int) -> dict[str, Cut]:
        """For EfficientNet-like models (stem, ``blocks`` of stages, ``conv_head``): the input of the last stage and
        of the last two, each with the stages above it, conv_head and bn2 as its top."""
        m = self._meta_model
        if not all(hasattr(m, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")):
            return {}
        shape = self.preprocessing(WeightsInfo("none", "none")).input_shape
        with torch.no_grad():
            x = m.bn1(m.conv_stem(torch.empty(1, *shape, device="meta")))
            shapes = [tuple((x := block(x)).shape[1:]) for block in m.blocks]
        n, cuts = len(m.blocks), {}
        for k in (n - 2, n - 3):
            top = f"blocks[{k + 1}:], conv_head, bn2 ({n - 1 - k} stage{'s' if n - 2 > k else ''} and the head conv)"
            about = f"blocks[{k}]'s output {' x '.join(map(str, shapes[k]))}; trains {top}"
            cuts[f"blocks.{k}"] = stage_cut(f"blocks.{k}", shapes[k], top, dim, TOP_DROPOUT, about)
        return cuts

    def split(self, weights: WeightsInfo, cut: str, with_top: bool = True) -> tuple[nn.Module, nn.Module | None]:
        if not self.cut(cut).trainable:
            return super().split(weights, cut, with_top)
        k, m = int(cut.split(".")[1]), self._loaded(weights, cut)
        top = nn.Sequential(*m.blocks[k + 1 :], m.conv_head, m.bn2, m.global_pool) if with_top else None
        return Flat(m.conv_stem, m.bn1, *m.blocks[: k + 1]), top

    def resolve_weights(self, weights: str) -> WeightsInfo:
        local = resolve_local(weights, self.name)
        if local is not None:
            return local
        cfg = self._cfg
        tag = cfg.get("hf_hub_id") or f"{self.arch}.{cfg.get('tag', '')}"
        return WeightsInfo("hub", tag, url=cfg.get("hf_hub_id") or cfg.get("url", ""), source="timm")

    def preprocessing(self, weights: WeightsInfo) -> Preprocessing:
        """timm's own eval transform for the model (``create_transform`` of ``resolve_model_data_config``), read
        off as data: its Resize and CenterCrop sizes and interpolation, the config's mean and std."""
        from torchvision import transforms as T

        timm = _timm()
        cfg = timm.data.resolve_model_data_config(self._meta_model)
        steps = {type(t): t for t in timm.data.create_transform(**cfg, is_training=False).transforms}
        resize, crop = steps.get(T.Resize), steps.get(T.CenterCrop)
        if resize is None or crop is None:  # squash or border crop modes build other steps
            mode = cfg.get("crop_mode", "center")
            raise FlowerfeatError(f"{self.name}: crop mode {mode!r} is not supported; choose another model")
        size = (resize.size,) if isinstance(resize.size, int) else tuple(resize.size)
        h, w = crop.size
        return Preprocessing(
            size, (h,) if h == w else (h, w), tuple(cfg["mean"]), tuple(cfg["std"]), resize.interpolation.value
        )

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
        return self._loaded(weights, cut)

    def _loaded(self, weights: WeightsInfo, cut: str) -> nn.Module:
        """The whole model (its pooled pre-logits out) with ``weights``."""
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
