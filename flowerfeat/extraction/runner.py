"""The loop, and nothing else: reader -> trunk -> writer, each step timed. The writer is a background thread that
appends finished batches to the shard log, so the trunk never waits on disk."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from flowerfeat import store
from flowerfeat.progress import Progress, Reporter
from flowerfeat.recipe import Trunk


class Writer:
    """Background thread that moves finished batches into the shard log."""

    def __init__(self, log: store.ShardLog, depth: int = 4):
        self.log, self.q, self.error, self.write_s = log, queue.Queue(depth), None, 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while (job := self.q.get()) is not None:
            if self.error is None:
                try:
                    rows, ids, skipped, ready = job
                    if ready is not None:  # the rows' device-to-host copy is still in flight
                        ready.synchronize()
                    t = time.perf_counter()
                    self.log.append(rows.numpy() if rows is not None else None, ids, skipped)
                    self.write_s += time.perf_counter() - t
                except BaseException as e:  # surfaced in the main thread by put()/close()
                    self.error = e

    def put(self, rows: torch.Tensor | None, ids: list[int], skipped: list[tuple[int, str]], ready=None):
        """Queue a batch (``rows`` None when all its images were skipped); ``ready`` (a CUDA event) marks when
        ``rows`` holds its values."""
        if self.error:
            raise self.error
        self.q.put((rows, ids, skipped, ready))

    def close(self):
        self.q.put(None)
        self.thread.join()
        self.log.close()
        if self.error:
            raise self.error


def run_batches(
    trunk: Trunk, loader, writer: Writer, on_batch: Callable[[int, float, float], None], pad_to: int = 0
) -> tuple[float, float]:
    """The loop itself: (read wait, compute) seconds. ``loader`` yields (x or None, unit ids, skipped).

    On CUDA nothing here waits for the GPU: each batch's features are copied to pinned memory asynchronously and the
    writer thread waits for them, so the next batch is read and prepared while the trunk runs. A short batch (the
    last one, or one with skipped images) is padded to ``pad_to`` rows there, so cuDNN's benchmark mode does not
    re-tune every convolution for a new shape. "compute" is then the time spent issuing work, not GPU time.
    """
    read_s = compute_s = 0.0
    cuda = trunk.device.type == "cuda"
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            x, ids, skipped = next(it)
        except StopIteration:
            break
        t1 = time.perf_counter()
        y = ready = None  # y None: every image of the batch was unreadable
        if x is not None:
            n = x.shape[0]
            x = x.to(trunk.device, non_blocking=True)
            if cuda and n < pad_to:
                x = torch.cat([x, x.new_zeros((pad_to - n, *x.shape[1:]))])
            y = trunk.rows(x)[:n]  # (B, D)
            if cuda:
                host = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
                host.copy_(y, non_blocking=True)
                y, ready = host, torch.cuda.Event()
                ready.record()
            else:
                y = y.cpu()
        t2 = time.perf_counter()
        writer.put(y, ids, skipped, ready)
        read_s += t1 - t0
        compute_s += t2 - t1
        on_batch(len(ids) + len(skipped), t1 - t0, t2 - t1)
    return read_s, compute_s


@dataclass
class LoopTimes:
    """Where one split's loop spent its time."""

    read_s: float = 0.0  # waiting on the reader
    compute_s: float = 0.0
    write_s: float = 0.0  # the writer thread's appends
    loop_s: float = 0.0  # the whole loop, the readers' start included


def run_with_progress(name: str, done_before: int, total: int, batches: list, make_loader, trunk_of, log,
                      pad_to: int, reporter: Reporter) -> LoopTimes:  # fmt: skip
    """``batches`` of split ``name`` through ``trunk_of()`` into ``log``, reporting progress after each batch."""
    prog = Progress(name, done_before, total, start_done=done_before)
    reporter.update(prog)
    times, t_loop = LoopTimes(), time.perf_counter()
    writer = Writer(log)
    try:
        if batches:

            def on_batch(n, r, c):
                prog.done += n
                prog.read_s += r
                prog.compute_s += c
                prog.write_s = writer.write_s
                prog.loop_s = time.perf_counter() - t_loop
                reporter.update(prog)

            times.read_s, times.compute_s = run_batches(trunk_of(), make_loader(batches), writer, on_batch, pad_to)
    finally:
        writer.close()
    times.write_s = writer.write_s
    times.loop_s = prog.loop_s = time.perf_counter() - t_loop
    reporter.split_done(prog)
    return times
