"""Batched JPEG decoding and the weights' preprocessing on the GPU; every other image takes the CPU (PIL) path.

Two ways to feed the device (``--decode``): ``gpu`` decodes with nvjpeg on the device, the workers only read bytes and
parse headers; ``hybrid`` decodes in the workers with torchvision's CPU decoder (libjpeg-turbo, the library PIL
uses, so its pixels match PIL's) and hands over uint8 pixels. Either way each batch crosses from the workers as one
packed tensor and the resize, crop and normalisation run on the device. A file goes this way only when it is a
plain RGB/grayscale JPEG, complete (ends with the EOI marker) and of sane size (progressive ones only for
``hybrid``); CMYK, truncated and non-JPEG files and augmented views take the CPU path, which records unreadable ones
as skipped. EXIF orientation is read from the header and applied on the device after decoding (nvjpeg ignores it).
On a machine without CUDA the same code runs on the CPU, so it is testable anywhere.
"""

from __future__ import annotations

import collections
import io
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image

from flowerfeat.data import BadImage, UnitDataset, load_image


class Encoded(NamedTuple):
    """A JPEG file the device path takes, as the reader found it."""

    data: bytearray  # the whole file
    orientation: int  # EXIF orientation 1-8, applied after decoding
    n_pixels: int  # width x height, from the header


class Decoded(NamedTuple):
    """A JPEG decoded in the reader (hybrid mode)."""

    pixels: torch.Tensor  # (H, W, 3) uint8
    orientation: int
    n_pixels: int


class Sample(NamedTuple):
    """What a reader yields for one unit: an image for the device path, or the CPU path's outcome."""

    image: Encoded | Decoded | None  # None: the CPU path took the unit
    tensor: torch.Tensor | None  # (3, 224, 224) prepared by the CPU path; None with ``image`` or when skipped
    unit: int
    reason: str  # why the CPU path skipped the unit ("" if it did not)
    path: Path


def gpu_eligible(path, progressive: bool = False, max_image_pixels: int | None = None) -> Encoded | None:
    """The file as an ``Encoded`` if the GPU decoder can take it, else None (then the CPU path decides). Progressive
    JPEGs only with ``progressive`` (libjpeg decodes them, nvjpeg's batched hardware path does not); images over
    ``max_image_pixels`` (default: Pillow's decompression-bomb limit) never."""
    try:
        os.fsdecode(path).encode("utf-8")  # non-UTF-8 names go to the CPU path, which skips them with the reason
        with open(path, "rb") as f:
            data = bytearray(f.read())  # writable: torch.frombuffer wraps it without a copy or a warning
        if data[:3] != b"\xff\xd8\xff" or not data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # header only: no pixels decoded
                n_pixels = im.width * im.height
                if (
                    im.format != "JPEG"
                    or im.mode not in ("RGB", "L")
                    or n_pixels > (max_image_pixels or Image.MAX_IMAGE_PIXELS)
                ):
                    return None
                if not progressive and (im.info.get("progression") or im.info.get("progressive")):
                    return None  # nvjpeg's batched hardware path is for baseline JPEGs
                orientation = im.getexif().get(0x0112, 1)
        return Encoded(data, orientation if orientation in range(1, 9) else 1, n_pixels)
    except (
        OSError,
        ValueError,
        SyntaxError,
        UnicodeError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ):
        return None


def apply_orientation(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image as PIL's ImageOps.exif_transpose would turn it, for EXIF orientation 1-8."""
    if orientation == 2:
        return img.flip(2)
    if orientation == 3:
        return img.flip(1, 2)
    if orientation == 4:
        return img.flip(1)
    if orientation == 5:
        return img.transpose(1, 2)
    if orientation == 6:
        return img.rot90(-1, (1, 2))
    if orientation == 7:
        return img.transpose(1, 2).flip(1, 2)
    if orientation == 8:
        return img.rot90(1, (1, 2))
    return img


class RawUnitDataset(UnitDataset):
    """Yields a ``Sample`` per unit: the JPEG file's bytes (``Encoded``) for the device path, or the CPU path's
    outcome."""

    progressive = False  # whether progressive JPEGs take this path
    max_image_pixels: int | None = None  # bigger images take the CPU path

    def __getitem__(self, unit: int) -> Sample:
        path = self.split.root / self.split.items[unit // (1 + self.n_views)].relpath
        eligible = unit % (1 + self.n_views) == 0  # augmented views take the CPU path
        encoded = gpu_eligible(path, self.progressive, self.max_image_pixels) if eligible else None
        if encoded is not None:
            return Sample(encoded, None, unit, "", path)
        tensor, _, reason = super().__getitem__(unit)
        return Sample(None, tensor, unit, reason, path)


class DecodedUnitDataset(RawUnitDataset):
    """As RawUnitDataset, but the worker decodes the JPEG with torchvision's CPU decoder (libjpeg-turbo) and yields
    its pixels (``Decoded``) in place of the bytes. A file that decoder refuses, and any image over
    ``max_image_pixels``, takes the CPU (PIL) path, which hands over 224x224 (0.6 MB): a batch of 256 decoded
    12-megapixel photos would need 9 GB of shared memory per batch in flight; this way a batch holds at most 768 MiB
    of pixels."""

    progressive = True
    max_image_pixels = 2**20

    def __getitem__(self, unit: int) -> Sample:
        from torchvision.io import ImageReadMode, decode_jpeg

        sample = super().__getitem__(unit)
        if sample.image is None:
            return sample
        try:
            data = torch.frombuffer(sample.image.data, dtype=torch.uint8)
            img = decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=False)  # rotated on the device
        except RuntimeError:
            tensor, _, reason = UnitDataset.__getitem__(self, unit)
            return Sample(None, tensor, unit, reason, sample.path)
        # torchvision's CPU decoder returns a (3, H, W) view of (H, W, 3) memory: hand over that memory as it is
        decoded = Decoded(img.permute(1, 2, 0), sample.image.orientation, sample.image.n_pixels)
        return sample._replace(image=decoded)


@dataclass
class RawBatch:
    """One batch as the workers hand it over: all JPEG bytes (or, decoded in the workers, all pixels) in one tensor,
    so one shared-memory transfer per batch, not one per image; the images the CPU path already prepared, and the
    skipped units."""

    blob: torch.Tensor | None  # uint8: the JPEGs, or their (H, W, 3) pixels, back to back
    lengths: list[int]  # bytes of each image in ``blob``
    orientations: list[int]
    n_pixels: list[int]  # width x height of each image
    units: list[int]
    paths: list
    cpu: torch.Tensor | None  # (k, 3, 224, 224) normalised on the CPU
    cpu_units: list[int]
    skipped: list[tuple[int, str]]
    shapes: list[tuple[int, int]] | None = None  # (H, W) of each decoded image; None when blob holds JPEG bytes


def _packed(parts: list[torch.Tensor]) -> torch.Tensor:
    """1-D uint8 tensors back to back. In a DataLoader worker the result is written straight into shared memory, as
    torch's default_collate does, so handing it to the main process copies nothing more."""
    out = None
    if torch.utils.data.get_worker_info() is not None:
        out = parts[0].new(parts[0]._typed_storage()._new_shared(sum(p.numel() for p in parts)))
    return torch.cat(parts, out=out)


def collate_raw(batch: list[Sample]) -> RawBatch:
    device_path = [s for s in batch if s.image is not None]
    cpu = [s for s in batch if s.tensor is not None]
    decoded = bool(device_path) and isinstance(device_path[0].image, Decoded)
    if decoded:
        parts = [s.image.pixels.reshape(-1) for s in device_path]
    else:
        parts = [torch.frombuffer(s.image.data, dtype=torch.uint8) for s in device_path]
    return RawBatch(
        blob=_packed(parts) if parts else None,
        lengths=[len(p) for p in parts],
        orientations=[s.image.orientation for s in device_path],
        n_pixels=[s.image.n_pixels for s in device_path],
        units=[s.unit for s in device_path],
        paths=[s.path for s in device_path],
        cpu=torch.stack([s.tensor for s in cpu]) if cpu else None,
        cpu_units=[s.unit for s in cpu],
        skipped=[(s.unit, s.reason) for s in batch if s.image is None and s.tensor is None],
        shapes=[tuple(s.image.pixels.shape[:2]) for s in device_path] if decoded else None,
    )


class GpuPreprocess:
    """Turn a RawBatch into (normalised (B, 3, H, W) tensor on ``device``, unit ids, skipped), as the weights'
    transform (``Preprocessing.transform``) would: from libjpeg's pixels (hybrid) PIL's images up to PIL's
    fixed-point resize weights; nvjpeg's pixels differ slightly from libjpeg's (scripts/gpu_check.sh measures the
    agreement with the PIL path).

    Images of one size are resized together (one kernel per size, not per image), and nothing here waits for the
    trunk, so the next batch is prepared while it still runs on the previous one. Rows come out grouped by size;
    the unit ids say which row is which. A batch is decoded and resized in chunks of at most ``chunk_pixels`` pixels
    (64 Mpx: about 0.8 GB as floats), so a batch of 12-megapixel photos does not need tens of GB of GPU memory.
    """

    def __init__(self, device: torch.device, preprocessing, chunk_pixels: int = 64 * 2**20):
        self.device, self.transform = device, preprocessing.transform()  # the CPU path, for what the device refuses
        self.resize = list(preprocessing.resize_size)
        self.crop = list(preprocessing.crop_size) * (2 if len(preprocessing.crop_size) == 1 else 1)  # [h, w]
        self.mean = torch.tensor(preprocessing.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(preprocessing.std, device=device).view(1, 3, 1, 1) * 255
        if len(self.resize) != 1:  # transforms() resizes the shorter side to one size
            raise ValueError(f"expected one resize size, got {self.resize}")
        self.mode = preprocessing.interpolation  # the model's own: bilinear (VGG16) or bicubic (EfficientNets)
        if self.mode not in ("bilinear", "bicubic"):  # torch's antialiased kernels match PIL's for these two
            raise ValueError(f"no device resize for {self.mode} interpolation; use --decode cpu")
        self.chunk_pixels = chunk_pixels
        self._local = threading.local()  # each preparing thread's CUDA stream

    def __call__(self, batch: RawBatch):
        return self.handover(self.prepare(batch))

    def batches(self, loader, threads: int = 2):
        """Prepare the loader's batches on ``threads`` threads, in order: while one thread waits for the JPEG
        decoder, another issues the resizes of the next batch, and the caller issues the trunk."""
        with ThreadPoolExecutor(threads, thread_name_prefix="gpu-preprocess") as pool:
            pending: collections.deque = collections.deque()
            for batch in loader:
                pending.append(pool.submit(self.prepare, batch))
                if len(pending) > threads:
                    yield self.handover(pending.popleft().result())
            while pending:
                yield self.handover(pending.popleft().result())

    def prepare(self, batch: RawBatch):
        """Issue the work of one batch (any thread). On CUDA it runs on the thread's own stream, which is synchronised
        first: nvjpeg writes on torchvision's internal stream into memory handed out by this stream's allocator pool,
        so nothing queued earlier on this stream may still be using that memory (without this, a batch's decode
        could overwrite memory the previous batch's resize still reads)."""
        if self.device.type != "cuda":
            return (*self._prepare(batch), None)
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        stream.synchronize()
        with torch.cuda.stream(stream):
            x, ids, skipped = self._prepare(batch)
            ready = torch.cuda.Event()
            ready.record(stream)
        return x, ids, skipped, ready

    def handover(self, prepared):
        """(x, ids, skipped) for the consuming thread: its stream waits for the batch, which it now also uses."""
        x, ids, skipped, ready = prepared
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            if x is not None:
                x.record_stream(current)  # the allocator keeps x's memory until the trunk on `current` is done
        return x, ids, skipped

    def _prepare(self, batch: RawBatch):
        skipped = list(batch.skipped)
        parts, ids, fallback, fallback_units = [], [], [], []
        if batch.blob is None:
            datas = []
        elif batch.shapes is None:  # JPEG bytes, left in host memory for the decoder
            datas = list(torch.split(batch.blob, batch.lengths))
        else:  # pixels decoded in the workers: to the device in one copy, each (H, W, 3) image seen as (3, H, W)
            images = torch.split(self._to_device(batch.blob), batch.lengths)
            datas = [d.view(h, w, 3).permute(2, 0, 1) for d, (h, w) in zip(images, batch.shapes)]
        for chunk in _chunks(batch.n_pixels, self.chunk_pixels):
            by_size: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}  # (h, w) -> [(unit, image)]
            chunk_datas = [datas[k] for k in chunk]
            for k, img in zip(chunk, self._decode(chunk_datas) if batch.shapes is None else chunk_datas):
                if img is None:  # the GPU decoder refused it: the CPU path decides
                    try:
                        fallback.append(self.transform(load_image(batch.paths[k])))
                        fallback_units.append(batch.units[k])
                    except BadImage as e:
                        skipped.append((batch.units[k], str(e)))
                    continue
                img = apply_orientation(img, batch.orientations[k])
                by_size.setdefault(tuple(img.shape[1:]), []).append((batch.units[k], img))
            for group in by_size.values():
                imgs = [img for _u, img in group]
                parts.append(self._resize(torch.stack(imgs) if len(imgs) > 1 else imgs[0][None]))
                ids += [u for u, _img in group]
        if parts:  # one normalisation for all the GPU-decoded rows
            parts = [(torch.cat(parts) - self.mean) / self.std]
        for t in (batch.cpu, torch.stack(fallback) if fallback else None):
            if t is not None:  # already normalised on the CPU
                parts.append(self._to_device(t))
        ids += batch.cpu_units + fallback_units
        if not parts:
            return None, [], skipped
        return (torch.cat(parts) if len(parts) > 1 else parts[0]), ids, skipped

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the device, copied through pinned memory without making this thread wait."""
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """(g, 3, H, W) uint8 images of one size -> (g, 3, crop) floats in 0..255: transforms()'s resize of the
        shorter side and centre crop as PIL does them, the horizontal pass then the vertical, each rounded to 8 bits
        (rounding the float result once left a quarter of a grey level on every value: cosine 0.995 at pool5 on
        some real photos, docs/benchmarks.md)."""
        h, w = x.shape[-2:]
        (short, long), rs = sorted((h, w)), self.resize[0]
        nh, nw = (rs, int(rs * long / short)) if h <= w else (int(rs * long / short), rs)
        x = x.float()
        for size in ((h, nw), (nh, nw)):  # at an unchanged size PIL skips the pass (bilinear would be the identity)
            if size != tuple(x.shape[-2:]):
                x = torch.nn.functional.interpolate(x, size=size, mode=self.mode, antialias=True, align_corners=False)
                x = (x + 0.5).floor_().clamp_(0, 255)  # PIL's rounding: half up, clipped to 8 bits
        (ch, cw) = self.crop
        top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
        return x[..., top : top + ch, left : left + cw]

    def _decode(self, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        # EXIF orientation is applied by the caller: nvjpeg ignores it, so the CPU decoder must too (same code path).
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=False))
        except RuntimeError:  # one odd file fails the whole batch: decode one by one
            out: list[torch.Tensor | None] = []
            for data in datas:
                try:
                    out.append(
                        decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=False)
                    )
                except RuntimeError:
                    out.append(None)
            return out


def _chunks(n_pixels: list[int], budget: int) -> list[list[int]]:
    """Consecutive index runs whose pixel counts add up to at most ``budget`` (a bigger image gets a run alone)."""
    runs: list[list[int]] = []
    total = budget + 1
    for k, n in enumerate(n_pixels):
        if total + n > budget:
            runs.append([])
            total = 0
        runs[-1].append(k)
        total += n
    return runs
