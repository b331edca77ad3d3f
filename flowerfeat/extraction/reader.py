"""The reader: batches of (images on the device or in memory, unit ids, skipped) for a list of batches of units,
read by DataLoader processes, prepared on the CPU (PIL) or, in the gpu and hybrid modes, on the device."""

from __future__ import annotations

import torch

from flowerfeat.backbones import Preprocessing
from flowerfeat.data import Augment, Split, UnitDataset, collate_units

PREP_THREADS = 2  # threads preparing GPU-decoded batches: the fastest count measured (docs/benchmarks.md)


def draft_size(preprocessing: Preprocessing) -> tuple[int, int]:
    """(width, height) a JPEG must keep when decoded at a reduced scale: the resize's (the shorter side's size on
    both sides, or the squashed size)."""
    r = preprocessing.resize_size
    return (r[0], r[0]) if len(r) == 1 else (r[1], r[0])


def make_loader(
    split: Split,
    n_views: int,
    view_seed: int,
    batches: list[list[int]],
    *,
    preprocessing: Preprocessing,
    mode: str,
    device: torch.device,
    workers: int,
    view_scale: float = 0.08,
):
    """Batches of (x or None, unit ids, skipped) for ``batches``, read by ``workers`` processes; in the gpu and hybrid
    modes prepared on ``device``."""
    from torch.utils.data import DataLoader

    on_device = mode not in ("cpu", "draft")  # JPEGs resized on the device (and, in gpu mode, decoded there)
    dataset_type = UnitDataset
    if on_device:
        from flowerfeat.gpudecode import DecodedUnitDataset, GpuPreprocess, RawUnitDataset, collate_raw

        dataset_type = DecodedUnitDataset if mode == "hybrid" else RawUnitDataset
    transform = preprocessing.transform()
    augment = Augment(preprocessing.crop_size, preprocessing.resize_size, view_scale)
    dataset = dataset_type(split, n_views, transform, augment, view_seed)
    if mode == "draft":
        dataset.draft = draft_size(preprocessing)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate_raw if on_device else collate_units,
        pin_memory=device.type == "cuda" and not on_device,  # GpuPreprocess pins what goes to the device
        # batches queued per reader: decoded ones are big (a 256-image batch of pixels ~90 MB of shared memory),
        # and readers that decode are many
        prefetch_factor=(4 if mode == "gpu" else 2) if workers else None,
    )
    if on_device:  # (x on device, unit ids, skipped) per batch, prepared on the device
        return GpuPreprocess(device, preprocessing).batches(loader, PREP_THREADS)
    return loader
