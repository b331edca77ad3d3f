"""What a trunk's weights are and where: their identity (keyed into every cache), sha256, and loading a local file."""

from __future__ import annotations

import hashlib
import http.client
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from flowerfeat.errors import FlowerfeatError

# What torch.load raises on a file that is not a (safe) state dict: not a zip or pickle (UnpicklingError, also for
# pickled code under weights_only), empty (EOFError), cut short (RuntimeError from the zip reader).
LOAD_ERRORS = (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, zipfile.BadZipFile)
# What a download raises offline: URLError, timeouts, SSL errors and the hub's "not in the local cache" are OSErrors;
# a cut connection is an HTTPException; a corrupt download fails the hash check with a RuntimeError.
DOWNLOAD_ERRORS = (OSError, http.client.HTTPException, RuntimeError)


@dataclass(frozen=True)
class WeightsInfo:
    """Where a trunk's weights come from, precisely enough to key a cache on."""

    kind: str  # "hub" (the model's published weights), "file" or "none" (seeded random init)
    name: str  # the published weights' name (e.g. VGG16_Weights.IMAGENET1K_V1), the file name, or "none"
    sha256: str = ""  # of the file ("" for published weights: their URL carries their hash)
    url: str = ""
    path: str = ""  # the file's absolute path when it was resolved (kind "file"), so a head can find it again
    source: str = ""  # who publishes hub weights (the family says: torchvision, timm, ...)

    @property
    def identity(self) -> str:
        if self.kind == "hub":
            return f"{self.source}:{self.name}:{self.url}"
        if self.kind == "file":
            return f"file:{self.name}:sha256={self.sha256}"
        return "none:random-init-seed-0"

    @property
    def tag(self) -> str:
        """Short name of the weights in cache folder names: imagenet, random, <file stem>-<sha256[:8]>, custom-..."""
        if self.kind == "hub":
            return "imagenet"
        if self.kind == "file":
            return f"{safe_name(Path(self.name).stem)}-{self.sha256[:8]}"
        return "random"

    @classmethod
    def from_identity(cls, identity: str, sha256: str = "", path: str = "") -> WeightsInfo:
        """The WeightsInfo a feature file or head recorded (its ``weights``, ``weights_sha256``, ``weights_path``)."""
        kind, _, rest = identity.partition(":")
        if kind == "none":
            return cls("none", "none")
        if kind == "file":
            return cls("file", rest.rsplit(":sha256=", 1)[0], sha256, path=path)
        name, _, url = rest.partition(":")  # the published weights of ``kind``'s hub: torchvision, timm, ...
        return cls("hub", name, url=url, source=kind)


def safe_name(text: str) -> str:
    """``text`` with anything but letters, digits, '.', '_' and '-' replaced, for a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_local(weights: str, model: str) -> WeightsInfo | None:
    """``none`` or a local file as a WeightsInfo; None for the other values (the model's published weights)."""
    if weights.lower() == "none":
        return WeightsInfo("none", "none")
    if weights in ("imagenet", "DEFAULT"):
        return None
    path = Path(weights)
    if not path.is_file():
        what = "is a directory, not a weights file" if path.is_dir() else "weights file not found"
        raise FlowerfeatError(
            f"{path}: {what}; pass --weights PATH to a {model} state dict, "
            "--weights imagenet to download the published ones, or --weights none for random init"
        )
    return WeightsInfo("file", path.name, sha256_file(path), path=str(path.resolve()))


def load_state_dict(path: str, model: str) -> dict:
    """A state dict of tensors from ``path`` (``torch.load(weights_only=True)``: no code runs); one-line errors."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as e:
        raise FlowerfeatError(f"{path}: not a loadable state dict ({type(e).__name__}); pass a {model} .pth") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FlowerfeatError(f"{path}: not a state dict of tensors; pass a {model} .pth")
    return state


def check_keys(state: dict, own: dict, path: str, model: str, cut: str) -> None:
    """Refuse a state dict that lacks (or misshapes) a tensor of ``own`` (the cut model's state dict), in one line."""
    missing = [k for k in own if k not in state]
    if missing:
        more = f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""
        raise FlowerfeatError(
            f"{path}: missing {', '.join(missing[:4])}{more} needed for --layer {cut} of {model}; "
            f"pass a {model} state dict (or a cut it covers)"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise FlowerfeatError(
                f"{path}: {k} has shape {tuple(state[k].shape)}, {model} needs {tuple(v.shape)}; "
                f"pass a {model} state dict"
            )


def download_error(model: str, url: str, e: Exception, where: str) -> FlowerfeatError:
    return FlowerfeatError(
        f"could not download {model} weights from {url} ({type(e).__name__}); pass --weights PATH to a local "
        f"{model} state dict, or place the file in {where}"
    )
