"""The reader: batches of (images on the device or in memory, unit ids, skipped) for a list of batches of units,
read by threads beside a CPU trunk or DataLoader processes beside a GPU, prepared on the CPU (PIL's uint8 pixels,
normalised a batch at a time) or, in the gpu and hybrid modes, on the device."""

from __future__ import annotations

import itertools

import torch

from flowerfeat.backbones import Preprocessing
from flowerfeat.data import Augment, Split, UnitDataset, collate_units

PREP_THREADS = 2  # threads preparing GPU-decoded batches: the fastest count measured (docs/benchmarks.md)
# Reader threads beside a CPU trunk run at this niceness (Linux, where it is a thread's own): the engine's threads then
# get the cores when they want them, and the readers the gaps. Lite0 on onnxruntime, 1,000 photos, six alternated
# rounds: 197.4 against 189.7 images/s at 0 (docs/benchmarks.md, "Threads").
READER_NICE = 10


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
    """Batches of (x or None, unit ids, skipped) for ``batches``, read by ``workers`` threads beside a CPU trunk
    (processes beside a GPU; 0: read between batches); in the gpu and hybrid modes prepared on ``device``."""
    from torch.utils.data import DataLoader

    on_device = mode not in ("cpu", "draft")  # JPEGs resized on the device (and, in gpu mode, decoded there)
    dataset_type = UnitDataset
    if on_device:
        from flowerfeat.gpudecode import DecodedUnitDataset, GpuPreprocess, RawUnitDataset, collate_raw

        dataset_type = DecodedUnitDataset if mode == "hybrid" else RawUnitDataset
    # CPU modes: readers send uint8 pixels, normalised here a batch at a time (Preprocessing.normalize)
    transform = preprocessing.transform() if on_device else preprocessing.pixels()
    augment = Augment(preprocessing.crop_size, preprocessing.resize_size, view_scale)
    dataset = dataset_type(split, n_views, transform, augment, view_seed)
    if mode == "draft":
        dataset.draft = draft_size(preprocessing)
    if device.type == "cpu" and not on_device and workers:  # threads beside a CPU trunk (docs/benchmarks.md, "Threads")
        return normalized(threaded(dataset, batches, workers), preprocessing, device)
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
    return normalized(loader, preprocessing, device)


def threaded(dataset, batches: list[list[int]], threads: int, depth: int = 2):  # depth 1, 2, 4: the same speed
    """Batches of ``dataset`` read by ``threads`` threads of this process, ``depth`` batches a thread ahead, in order.
    Pillow decodes and resizes without the GIL, so the threads run beside the engine; no process is forked."""
    import collections
    from concurrent.futures import ThreadPoolExecutor

    def read(batch):
        return collate_units([dataset[u] for u in batch])

    todo, pending = iter(batches), collections.deque()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="flowerfeat-reader", initializer=_lower_priority)
    with pool:
        try:
            for batch in itertools.islice(todo, threads * depth):
                pending.append(pool.submit(read, batch))
            while pending:
                done = pending.popleft().result()
                if (batch := next(todo, None)) is not None:
                    pending.append(pool.submit(read, batch))
                yield done
        finally:
            for f in pending:
                f.cancel()


def _lower_priority() -> None:
    """This reader thread at ``READER_NICE`` (a Linux thread's own niceness; elsewhere it would be the process's)."""
    import os
    import sys
    import threading

    if READER_NICE and sys.platform == "linux":
        me = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + READER_NICE))
        except OSError:  # a sandbox that refuses it: the readers run at the caller's priority
            pass


def normalized(loader, preprocessing: Preprocessing, device: torch.device):
    """The loader's uint8 batches moved to ``device`` and normalised there."""
    for x, ids, skipped in loader:
        if x is not None:
            x = preprocessing.normalize(x.to(device, non_blocking=True))
        yield x, ids, skipped
