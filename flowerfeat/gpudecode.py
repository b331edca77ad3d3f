"""Batched JPEG decoding and the weights' preprocessing on the GPU; every other image takes the CPU (PIL) path.

Workers only read bytes and parse headers (cheap), so the CPU never bottlenecks a fast GPU. A file goes to the
GPU only when it is a plain baseline RGB/grayscale JPEG, complete (ends with the EOI marker) and of sane size;
CMYK, truncated, non-JPEG files and augmented views take the CPU path, which records unreadable ones as skipped.
On a machine without CUDA the same code decodes with torchvision's CPU decoder, so it is testable anywhere.
"""

from __future__ import annotations

import io
import os
import warnings

import torch
from PIL import Image

from flowerfeat.data import BadImage, UnitDataset, load_image


def gpu_eligible(path) -> bytes | None:
    """The file's bytes if the GPU decoder can take it as is, else None (then the CPU path decides)."""
    try:
        os.fsdecode(path).encode("utf-8")  # non-UTF-8 names go to the CPU path, which skips them with the reason
        with open(path, "rb") as f:
            data = f.read()
        if data[:3] != b"\xff\xd8\xff" or not data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # header only: no pixels decoded
                if im.format != "JPEG" or im.mode not in ("RGB", "L") or im.width * im.height > Image.MAX_IMAGE_PIXELS:
                    return None
                if im.info.get("progression") or im.info.get("progressive"):
                    return None  # nvjpeg's batched path is for baseline JPEGs
        return data
    except (
        OSError,
        ValueError,
        SyntaxError,
        UnicodeError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ):
        return None


class RawUnitDataset(UnitDataset):
    """Yields (raw JPEG bytes tensor or None, CPU-preprocessed tensor or None, unit, skip reason, path)."""

    def __getitem__(self, i: int):
        unit = self.units[i]
        path = self.split.root / self.split.items[unit // (1 + self.n_views)].relpath
        raw = gpu_eligible(path) if unit % (1 + self.n_views) == 0 else None  # augmented views: CPU path
        if raw is not None:
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8), None, unit, "", path
        tensor, _, reason = super().__getitem__(i)
        return None, tensor, unit, reason, path


def collate_raw(batch):
    return batch  # a list: decoding happens on the device, in GpuPreprocess


class GpuPreprocess:
    """Turn a raw batch into the normalised (B, 3, 224, 224) tensor on ``device``, exactly as transforms() would
    up to resampling differences (checked by scripts/gpu_check.sh: cosine >= 0.999)."""

    def __init__(self, device: torch.device, transform):
        self.device, self.transform = device, transform
        self.resize = list(transform.resize_size)
        self.crop = list(transform.crop_size) * (2 if len(transform.crop_size) == 1 else 1)  # [h, w]
        self.mean = torch.tensor(transform.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(transform.std, device=device).view(1, 3, 1, 1)

    def __call__(self, batch):
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import functional as F

        raws = [(raw, unit, path) for raw, _t, unit, _r, path in batch if raw is not None]
        cpu = {unit: t for raw, t, unit, _r, _p in batch if t is not None}
        skipped = [(unit, reason) for raw, t, unit, reason, _p in batch if raw is None and t is None]
        gpu: dict[int, torch.Tensor] = {}
        if raws:
            try:
                decoded = decode_jpeg(
                    [r for r, _, _ in raws], mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True
                )
            except RuntimeError:  # one odd file fails the whole batch: decode one by one
                decoded = [self._one(r) for r, _, _ in raws]
            for img, (_raw, unit, path) in zip(decoded, raws):
                if img is not None:
                    gpu[unit] = F.center_crop(F.resize(img, self.resize, antialias=True), self.crop)  # (3,224,224) u8
                    continue
                try:  # the GPU decoder refused it: the CPU path decides
                    cpu[unit] = self.transform(load_image(path))
                except BadImage as e:
                    skipped.append((unit, str(e)))
        ids = sorted([*gpu, *cpu])
        if not ids:
            return None, [], skipped
        out = torch.empty((len(ids), 3, *self.crop), device=self.device)
        row = {u: k for k, u in enumerate(ids)}
        if gpu:  # one normalisation for the whole batch, not one per image
            at = torch.tensor([row[u] for u in gpu], device=self.device)
            out[at] = (torch.stack(list(gpu.values())).float() / 255 - self.mean) / self.std
        if cpu:
            at = torch.tensor([row[u] for u in cpu], device=self.device)
            out[at] = torch.stack(list(cpu.values())).to(self.device, non_blocking=True)
        return out, ids, skipped

    def _one(self, raw):
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)
        except RuntimeError:
            return None
