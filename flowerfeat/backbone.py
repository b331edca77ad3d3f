"""The frozen VGG16 trunk cut at fc7 / fc6 / pool5, its weights' identity, and the weights' own preprocessing."""

from __future__ import annotations

import hashlib
import http.client
import re
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flowerfeat.errors import FlowerfeatError

FEATURE_DIMS = {"fc7": 4096, "fc6": 4096, "pool5": 512 * 7 * 7, "pool5-gap": 512}
# Number of VGG16 classifier modules each cut keeps: classifier[:5] ends after fc7's ReLU, [:2] after fc6's.
_CLASSIFIER_KEEP = {"fc7": 5, "fc6": 2, "pool5": 0, "pool5-gap": 0}
# Positions of the 13 Conv2d modules in torchvision's vgg16().features.
_CONV_IDX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
# What torch.load raises on a file that is not a (safe) state dict: not a zip or pickle (UnpicklingError, also for
# pickled code under weights_only), empty (EOFError), cut short (RuntimeError from the zip reader).
LOAD_ERRORS = (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, zipfile.BadZipFile)
# What torchvision's download raises offline: URLError, timeouts and SSL errors are OSErrors; a cut connection is an
# HTTPException; a corrupt download fails the hash check with a RuntimeError.
DOWNLOAD_ERRORS = (OSError, http.client.HTTPException, RuntimeError)


@dataclass(frozen=True)
class WeightsInfo:
    """Where the trunk's weights come from, precisely enough to key a cache on."""

    kind: str  # "torchvision", "file", "none", or "custom" (a trunk handed in by code, e.g. tests)
    name: str  # enum name, file name, or "none"
    sha256: str  # of the file ("" for the enum: its URL carries its hash)
    url: str = ""
    path: str = ""  # the file's absolute path when it was resolved (kind "file"), so a head can find it again

    @property
    def identity(self) -> str:
        if self.kind == "torchvision":
            return f"torchvision:VGG16_Weights.{self.name}:{self.url}"
        if self.kind == "file":
            return f"file:{self.name}:sha256={self.sha256}"
        if self.kind == "custom":
            return f"custom:{self.name}"
        return "none:random-init-seed-0"

    @property
    def tag(self) -> str:
        """Short name of the weights in cache folder names: imagenet, random, <file stem>-<sha256[:8]>, custom-..."""
        if self.kind == "torchvision":
            return "imagenet" if self.name == "IMAGENET1K_V1" else self.name.lower()
        if self.kind == "file":
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.name).stem)
            return f"{stem}-{self.sha256[:8]}"
        return f"custom-{re.sub(r'[^A-Za-z0-9._-]+', '_', self.name)}" if self.kind == "custom" else "random"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_weights(weights: str) -> WeightsInfo:
    """Turn the --weights value into a WeightsInfo without loading or downloading anything."""
    from torchvision.models import VGG16_Weights

    if weights in ("imagenet", "IMAGENET1K_V1", "DEFAULT"):
        w = VGG16_Weights.IMAGENET1K_V1
        return WeightsInfo("torchvision", w.name, "", w.url)
    if weights.lower() == "none":
        return WeightsInfo("none", "none", "")
    path = Path(weights)
    if not path.is_file():
        what = "is a directory, not a weights file" if path.is_dir() else "weights file not found"
        raise FlowerfeatError(
            f"{path}: {what}; pass --weights PATH to a torchvision VGG16 state dict, "
            "--weights imagenet to download torchvision's, or --weights none for random init"
        )
    return WeightsInfo("file", path.name, sha256_file(path), path=str(path.resolve()))


def preprocessing() -> dict:
    """The IMAGENET1K_V1 weights' own eval transform parameters (torchvision's, never hand-copied)."""
    from torchvision.models import VGG16_Weights

    t = VGG16_Weights.IMAGENET1K_V1.transforms()
    return {
        "resize_size": list(t.resize_size),
        "crop_size": list(t.crop_size),
        "mean": list(t.mean),
        "std": list(t.std),
        "interpolation": t.interpolation.value,
        "antialias": bool(t.antialias),
    }


def build_transform():
    """PIL RGB image -> normalised (3, 224, 224) float tensor, exactly the weights' transforms()."""
    from torchvision.models import VGG16_Weights

    return VGG16_Weights.IMAGENET1K_V1.transforms()


class Augment:
    """Seeded RandomResizedCrop + horizontal flip on a PIL image (picklable for DataLoader workers)."""

    def __init__(self):
        t = build_transform()
        self.crop_size, self.resize_size = list(t.crop_size), list(t.resize_size)

    def __call__(self, img, seed: int):
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms import functional as F

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            i, j, h, w = RandomResizedCrop.get_params(img, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
            flip = bool(torch.rand(1) < 0.5)
        img = F.resized_crop(img, i, j, h, w, self.crop_size)
        # Brought to the eval transform's resize size, so its resize is a no-op and its centre crop keeps the
        # middle of the augmented view.
        img = F.resize(img, self.resize_size)
        return F.hflip(img) if flip else img


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
    """State-dict keys the cut needs: the 13 conv layers, plus fc6 (and fc7) for the classifier cuts."""
    keys = [f"features.{i}.{p}" for i in _CONV_IDX for p in ("weight", "bias")]
    fcs = {"fc7": (0, 3), "fc6": (0,)}.get(layer, ())
    return keys + [f"classifier.{i}.{p}" for i in fcs for p in ("weight", "bias")]


def _random_vgg16() -> nn.Module:
    """VGG16 with seeded random init: reproducible across processes, so resumed runs stay bit-identical."""
    from torchvision.models import vgg16

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return vgg16(weights=None)


def load_vgg16(info: WeightsInfo, layer: str, path: str | None = None) -> nn.Module:
    """Build torchvision's VGG16 and load the weights the cut needs; clear one-line errors otherwise."""
    from torchvision.models import VGG16_Weights, vgg16

    if info.kind == "none":
        return _random_vgg16()
    if info.kind == "torchvision":
        try:
            return vgg16(weights=VGG16_Weights[info.name], progress=False)
        except DOWNLOAD_ERRORS as e:  # all mean "could not fetch"
            raise FlowerfeatError(
                f"could not download VGG16 weights from {info.url} ({type(e).__name__}); "
                "pass --weights PATH to a local torchvision VGG16 state dict, or place the file in "
                f"{torch.hub.get_dir()}/checkpoints/"
            ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as e:
        raise FlowerfeatError(
            f"{path}: not a loadable state dict ({type(e).__name__}); pass a torchvision VGG16 .pth"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FlowerfeatError(f"{path}: not a state dict of tensors; pass a torchvision VGG16 .pth")
    need = required_keys(layer)
    missing = [k for k in need if k not in state]
    if missing:
        more = f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""
        raise FlowerfeatError(
            f"{path}: missing {', '.join(missing[:4])}{more} needed for --layer {layer}; "
            "use a full VGG16 state dict or a cut it covers (features.* alone serves pool5)"
        )
    model = _random_vgg16()
    own = model.state_dict()
    for k in need:
        if tuple(state[k].shape) != tuple(own[k].shape):
            raise FlowerfeatError(
                f"{path}: {k} has shape {tuple(state[k].shape)}, VGG16 needs {tuple(own[k].shape)}; "
                "pass a torchvision VGG16 state dict"
            )
    model.load_state_dict({k: state[k] for k in need}, strict=False)
    return model


def build_trunk(info: WeightsInfo, layer: str, path: str | None = None) -> Trunk:
    """Frozen trunk in eval mode (dropout off), no gradients."""
    trunk = Trunk(load_vgg16(info, layer, path), layer).eval()
    trunk.requires_grad_(False)
    return trunk


def cpu_has_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))


def trunk_rows(trunk: nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    """The trunk's float32 rows for a batch already on its device: inference mode, bf16 autocast when asked."""
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        return trunk(x).float()


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on CUDA or a CPU with native bf16 units, else fp32 (emulated bf16 is ~100x slower)."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or cpu_has_bf16() else "fp32"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FlowerfeatError(f"--device {device}: CUDA is not available here; use --device cpu or auto")
    return torch.device(device)


# ---------------------------------------------------------------------------------------------------------
# Engines: what runs the trunk. "torch" is the reference; "onnxruntime" runs the same graph, exported once per process,
# on the CPU in fp32 (1.2x torch's oneDNN on the 2-core machine, features at cosine 0.9999999: docs/benchmarks.md).


def engine_available(engine: str) -> bool:
    import importlib.util

    return engine == "torch" or all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx", "onnxscript"))


def resolve_engine(engine: str, device: torch.device, precision: str, previous: str | None = None) -> str:
    """The engine to run: as asked (refused with one line where it cannot run), or for "auto" the one an existing
    cache was made with (so nothing is recomputed), else onnxruntime where it is installed and the run is on the CPU
    in fp32, else torch."""
    fits = device.type == "cpu" and precision == "fp32"
    if engine == "auto":
        if previous in ("torch", "onnxruntime") and (previous == "torch" or (fits and engine_available(previous))):
            return previous
        return "onnxruntime" if fits and engine_available("onnxruntime") else "torch"
    if engine == "onnxruntime" and not fits:
        raise FlowerfeatError(f"--engine onnxruntime runs on the CPU in fp32 (here: {device.type}, {precision})")
    if not engine_available(engine):
        raise FlowerfeatError(f"--engine {engine} needs onnxruntime; install the extra: pip install 'flowerfeat[onnx]'")
    return engine


class OnnxTrunk(nn.Module):
    """A trunk run by ONNX Runtime: exported from the torch trunk once (free batch size), called like it."""

    def __init__(self, trunk: nn.Module, threads: int | None = None):
        import contextlib
        import io
        import tempfile

        import onnxruntime

        super().__init__()
        example = torch.zeros(2, 3, 224, 224)
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):  # its progress lines
            path = f"{tmp}/trunk.onnx"
            trunk = trunk.to(memory_format=torch.contiguous_format)
            torch.onnx.export(
                trunk, (example,), path, dynamo=True, dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC}},
                input_names=["x"], output_names=["rows"], external_data=False,
            )  # fmt: skip
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads or torch.get_num_threads()
            self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous().numpy()  # ONNX Runtime takes NCHW float32
        return torch.from_numpy(self.session.run(None, {"x": x})[0])


def on_engine(trunk: nn.Module, engine: str) -> nn.Module:
    """``trunk`` as ``engine`` runs it."""
    return OnnxTrunk(trunk) if engine == "onnxruntime" else trunk
