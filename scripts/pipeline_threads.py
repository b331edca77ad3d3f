"""The pipeline's thread budget, side by side in one process (docs/benchmarks.md, "Threads"): onnxruntime's threads
spinning or not, readers (threads, as flowerfeat reads beside a CPU trunk, at its niceness or the caller's, or
DataLoader processes, as it reads beside a GPU) x engine threads, each run a fresh extraction of the same photos, runs
alternated over rounds. Prints the loop's images/s with the trunk ready (exporting is left out). ``--streams``
times the default budget against two single-threaded engine calls in flight at once (two batches, one per core)
instead of one call on two threads, and checks that both give the same rows.

    python scripts/pipeline_threads.py --data flower_photos --model timm:tf_efficientnet_lite0 \\
        --weights tf_efficientnet_lite0_imagenet.pth --limit 400
"""

from __future__ import annotations

import argparse
import collections
import functools
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from flowerfeat import runtime, store
from flowerfeat.bench import bench_images
from flowerfeat.config import ExtractConfig
from flowerfeat.data import collate_units
from flowerfeat.extraction import reader, run_extraction, runner

# (onnxruntime spinning, readers, "threads" or "processes", engine threads, the reader threads' niceness)
SETTINGS = [(True, 2, "threads", 2, 10), (False, 2, "threads", 2, 10), (False, 2, "threads", 2, 0),
            (False, 1, "threads", 2, 10), (False, 1, "processes", 2, 0), (False, 2, "processes", 2, 0),
            (False, 2, "threads", 1, 10), (False, 0, "", 2, 0)]  # fmt: skip


def processes(dataset, batches, workers: int, depth: int = 2):
    """The readers as DataLoader processes, in place of ``reader.threaded``."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_units,
                      prefetch_factor=depth)  # fmt: skip


threaded = reader.threaded


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", default="timm:tf_efficientnet_lite0")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--engine", default="onnxruntime", choices=("torch", "onnxruntime"))
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8"))
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only-nice", action="store_true", help="the default budget at niceness 10 and 0 alone")
    ap.add_argument("--depths", default=None, help="e.g. 1,2,4: the default budget, reading that many batches ahead")
    ap.add_argument("--streams", action="store_true", help="one engine call on two threads against two on one each")
    a = ap.parse_args()
    cfg = ExtractConfig(data=a.data, model=a.model, weights=a.weights, engine=a.engine, precision=a.precision)
    train, test = bench_images(cfg, a.limit)
    n = len(train.items) + len(test.items)
    if a.depths:
        return read_ahead(cfg, train, test, [int(d) for d in a.depths.split(",")], a.rounds)
    if a.streams:
        return streams(cfg, train, test, a.rounds)
    for rnd in range(a.rounds):
        for spin, workers, kind, threads, nice in SETTINGS:
            if a.only_nice and (spin, workers, kind, threads) != (False, 2, "threads", 2):
                continue
            runtime.ORT_SPINNING, reader.READER_NICE = spin, nice
            torch.set_num_threads(threads)
            reader.threaded = processes if kind == "processes" else threaded
            with tempfile.TemporaryDirectory() as tmp:
                results = run_extraction(
                    cfg.replace(out=Path(tmp), workers=workers), splits={"train": train, "test": test}
                )
            loop = sum(r.seconds - r.trunk_s for r in results)
            print(f"round {rnd}: spinning {spin}, {workers} reader {kind or '(read between batches)'}"
                  f"{f' at nice {nice}' if kind == 'threads' else ''}, {threads} engine thread(s): "
                  f"{n / loop:.1f} images/s", flush=True)  # fmt: skip


def read_ahead(cfg: ExtractConfig, train, test, depths: list[int], rounds: int) -> None:
    """The default budget with the reader threads reading each of ``depths`` batches ahead, alternated."""
    n = len(train.items) + len(test.items)
    for rnd in range(rounds):
        for depth in depths:
            reader.threaded = functools.partial(threaded, depth=depth)
            with tempfile.TemporaryDirectory() as tmp:
                results = run_extraction(cfg.replace(out=Path(tmp)), splits={"train": train, "test": test})
            loop = sum(r.loop_s for r in results)
            print(f"round {rnd}: reading {depth} batch(es) ahead: {n / loop:.1f} images/s", flush=True)
    reader.threaded = threaded


def run_streams(trunk, loader, writer, on_batch, pad_to: int = 0, k: int = 2) -> tuple[float, float]:
    """``runner.run_batches`` with ``k`` batches in the engine at once, each call on its own thread (the engine made
    with one thread), written in order."""
    read_s = compute_s = 0.0
    pending, it = collections.deque(), iter(loader)
    with ThreadPoolExecutor(k) as pool:
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            read_s += time.perf_counter() - t0
            if batch is not None:
                x, ids, skipped = batch
                pending.append((pool.submit(lambda x: None if x is None else trunk.rows(x), x), ids, skipped))
            while pending and (len(pending) >= k or batch is None):
                future, ids, skipped = pending.popleft()
                t1 = time.perf_counter()
                writer.put(future.result(), ids, skipped)
                compute_s += time.perf_counter() - t1
                on_batch(len(ids) + len(skipped), 0.0, 0.0)
            if batch is None:
                return read_s, compute_s


def streams(cfg: ExtractConfig, train, test, rounds: int) -> None:
    """The default budget (one engine call on two threads) against two one-thread calls in flight, alternated."""
    n, rows, loop, caller_threads = len(train.items) + len(test.items), {}, runner.run_batches, torch.get_num_threads()
    for rnd in range(rounds):
        for name, run, threads in (("one call on 2 threads", loop, 2), ("two calls on 1 thread each", run_streams, 1)):
            runner.run_batches = run
            torch.set_num_threads(threads)
            with tempfile.TemporaryDirectory() as tmp:
                results = run_extraction(cfg.replace(out=Path(tmp)), splits={"train": train, "test": test})
                rows[name] = store.load_features(results[0].path).X
            print(f"round {rnd}: {name}: {n / sum(r.loop_s for r in results):.1f} images/s", flush=True)
        print(f"round {rnd}: the same rows: {bool((rows.popitem()[1] == rows.popitem()[1]).all())}", flush=True)
    runner.run_batches = loop
    torch.set_num_threads(caller_threads)


if __name__ == "__main__":
    main()
