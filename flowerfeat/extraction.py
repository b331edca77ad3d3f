"""The extraction loop: plan -> read -> trunk -> write -> finish, per split; resumable, sharded, each stage timed.

The model of the work. A split's *units* are its images times their views: unit ``u`` is image ``u // (1 + views)``,
view ``u % (1 + views)`` (view 0 is the centre crop). Units whose rows the previous finished file already holds are
reused; the others are cut into batches of ``batch_size`` in unit order, and batch ``i`` belongs to rank
``i % world``, so torchrun's ranks form the very batches one process would. Each rank appends its finished batches
to its own shard log, committed about once a second; a rerun resumes every rank after its last committed batch.
When all ranks are done, rank 0 merges the reused rows and every shard, in unit order, into the finished file.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import queue
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from flowerfeat import FORMAT_VERSION, __version__, runtime, store
from flowerfeat.backbones import Backbone, Cut, Preprocessing, get_backbone
from flowerfeat.config import ExtractConfig, batch_size_for
from flowerfeat.data import Augment, Split, UnitDataset, collate_units, scan_data
from flowerfeat.errors import FlowerfeatError
from flowerfeat.runtime import trunk_rows
from flowerfeat.weights import WeightsInfo
from flowerfeat.progress import LineReporter, Progress, Reporter

PREP_THREADS = 2  # threads preparing GPU-decoded batches: the fastest count measured (docs/benchmarks.md)


def decode_plan(decode: str, device: torch.device) -> tuple[str, str]:
    """(mode, decoder) for ``--decode`` on ``device``: mode cpu, gpu or hybrid (auto = gpu on CUDA, else cpu), and the
    decoder that makes the pixels, recorded in the cache key: pil, nvjpeg, or libjpeg (torchvision's CPU decoder:
    hybrid's workers, or the gpu mode's own code on a machine without CUDA)."""
    mode = decode if decode != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    return mode, {"cpu": "pil", "gpu": "nvjpeg" if device.type == "cuda" else "libjpeg", "hybrid": "libjpeg"}[mode]


def default_workers(mode: str, device: torch.device) -> int:
    """DataLoader processes when --workers is not given: 1 beside a CPU trunk (the trunk wants the cores); on CUDA,
    8 that only read JPEG bytes (gpu) or all the cores this rank can have but two, up to 32, that decode (cpu,
    hybrid). torchrun's ranks on one node share its cores."""
    if device.type != "cuda":
        return 1
    cores = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, cores) if mode == "gpu" else min(32, cores - 2))


@dataclass
class SplitResult:
    """What bringing one split's file up to date did, and where the time went."""

    split: str
    path: Path
    status: str  # "up to date", "extracted", "resumed", "updated"
    reason: str
    rows: int
    computed: int  # units that went through the trunk in this run
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of the unreadable images
    reused: int = 0  # rows copied from the previous file
    removed: int = 0  # rows of the previous file whose images are gone (or changed)
    done_before: int = 0  # units an interrupted earlier run had finished
    seconds: float = 0.0
    read_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0
    trunk_s: float = 0.0  # building the trunk (weights, engine), when this split was the first to need it
    loop_s: float = 0.0  # the extraction loop, workers' start included
    finish_s: float = 0.0  # merging the shard log into the finished file


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None


def dist_from_env() -> tuple[Dist, Callable[[], None]]:
    """Join torchrun's process group when WORLD_SIZE > 1 (gloo on CPU, nccl on GPUs); else a single-rank Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), lambda: None
    import torch.distributed as td

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    td.init_process_group(backend)
    return Dist(td.get_rank(), td.get_world_size(), td.barrier), td.destroy_process_group


@dataclass(frozen=True)
class Setup:
    """What an extraction works out once for all its splits: whose features, and how the trunk runs."""

    backbone: Backbone
    cut: Cut
    weights: WeightsInfo
    preprocessing: Preprocessing  # the weights' own
    folder: Path  # where the split files go: <out>/<model>-<cut>-<weights tag>
    feature_dim: int
    precision: str  # fp32 or bf16
    engine: str  # what runs the trunk: torch or onnxruntime
    device: torch.device
    mode: str  # decode mode: cpu, gpu or hybrid
    decoder: str  # what makes the pixels: pil, nvjpeg or libjpeg
    batch_size: int
    workers: int
    transform: Callable  # PIL image -> normalised (3, H, W) tensor, the weights' own
    augment: Augment
    # built on first use, so an up-to-date run never loads weights; an int8 trunk is calibrated on the split given
    get_trunk: Callable[..., torch.nn.Module]
    quantization: object = None  # quantize.Settings for --precision int8, else None


def resolve_setup(
    cfg: ExtractConfig, dist: Dist = Dist(), trunk: torch.nn.Module | None = None, reporter: Reporter | None = None
) -> Setup:
    """Resolve the model, its cut, weights, device, precision, decoder, batch size and readers for ``cfg``; nothing
    is loaded yet (an unknown model, cut or weights file is refused here, before anything is written).

    ``trunk`` replaces the model's trunk (tests hand in a small network); it must carry ``feature_dim`` and an
    ``identity`` string, which stands in for the weights' identity in the fingerprint.
    """
    backbone = get_backbone(cfg.model)
    cut = backbone.cut(cfg.layer)
    if trunk is None:
        winfo, feature_dim = backbone.resolve_weights(cfg.weights), cut.dim
    else:
        winfo, feature_dim = WeightsInfo("custom", trunk.identity), int(trunk.feature_dim)
    pre = backbone.preprocessing(winfo)
    device = runtime.resolve_device(cfg.device)
    if dist.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.rank % torch.cuda.device_count())
    mode, decoder = decode_plan(cfg.decode, device)
    folder = store.cache_dir(cfg.out, backbone.folder_name, cut.name, winfo.tag)
    precision = runtime.resolve_precision(cfg.precision, device)
    engine = runtime.resolve_engine(cfg.engine, device, precision, _cache_engine(folder, cfg.splits))
    quantization = int8_settings(folder, cfg) if precision == "int8" else None
    get_trunk = LazyTrunk(cfg, backbone, cut.name, winfo, trunk, pre, engine, device, quantization, folder, reporter)
    return Setup(
        backbone=backbone,
        cut=cut,
        weights=winfo,
        preprocessing=pre,
        folder=folder,
        feature_dim=feature_dim,
        precision=precision,
        engine=engine,
        device=device,
        mode=mode,
        decoder=decoder,
        batch_size=batch_size_for(device.type, cfg.batch_size),
        workers=cfg.workers if cfg.workers is not None else default_workers(mode, device),
        transform=pre.transform(),
        augment=Augment(pre.crop_size, pre.resize_size),
        get_trunk=get_trunk,
        quantization=quantization,
    )


@dataclass
class LazyTrunk:
    """The trunk, built on the first call (so an up-to-date run never loads weights): the model's own (or the one
    handed in), as the engine runs it; for int8 the quantized trunk kept in the cache folder, made first when it is
    not there (calibrated on the split passed: the run's training images)."""

    cfg: ExtractConfig
    backbone: Backbone
    cut: str
    weights: WeightsInfo
    given: torch.nn.Module | None  # a trunk handed in (tests), instead of the model's
    pre: Preprocessing
    engine: str
    device: torch.device
    quantization: object  # quantize.Settings, or None
    folder: Path
    reporter: Reporter | None
    built: torch.nn.Module | None = None

    def __call__(self, calibrate_on: Split | None = None) -> torch.nn.Module:
        if self.built is None:
            if self.quantization is not None and _int8_ready(self.folder, self.quantization):
                self.built = _load_int8(self.folder, self.reporter)
                return self.built
            t = self.given
            if t is None:
                what = "random init" if self.weights.kind == "none" else self.weights.name
                with (self.reporter or Reporter()).stage(f"loading {self.backbone.name} weights ({what})"):
                    t = self.backbone.build(self.weights, self.cut)
            if self.quantization is not None:
                _make_int8(t, self.pre, self.quantization, self.folder, calibrate_on, self.reporter)
                self.built = _load_int8(self.folder, self.reporter)
            else:
                self.built = _on_device(t, self.cfg, self.engine, self.device, self.pre, self.reporter)
        return self.built


def int8_settings(folder: Path, cfg: ExtractConfig):
    """The quantization of the int8 trunk kept in ``folder`` when its calibration size matches, so a later run (new
    images, a resume) keys and computes with the very same model; else the settings for this CPU."""
    from flowerfeat import quantize

    record = quantize.read_record(folder)
    if record is not None and record["settings"].get("calibration") == cfg.calibration:
        return quantize.Settings(**record["settings"])
    return quantize.settings_for_this_cpu(cfg.calibration, seed=0)


def _int8_ready(folder: Path, settings) -> bool:
    from flowerfeat import quantize
    from flowerfeat.weights import sha256_file

    record = quantize.read_record(folder)
    path = folder / quantize.MODEL_FILE
    return (
        record is not None and record["settings"] == settings.to_dict() and path.is_file()
        and sha256_file(path) == record["sha256"]
    )  # fmt: skip


def _make_int8(trunk, pre: Preprocessing, settings, folder: Path, split: Split | None, reporter) -> None:
    """Quantize ``trunk`` into ``folder``, calibrated on the first ``settings.calibration`` images of ``split``'s
    seeded stratified order (the run's training images), and record what was done."""
    from flowerfeat import quantize
    from flowerfeat.data import BadImage, load_image, stratified_order
    from flowerfeat.weights import sha256_file

    if split is None:
        raise FlowerfeatError("--precision int8 calibrates on training images; extract the train split in this run")
    quantize.check_calibration(settings.calibration, len(split.classes))
    order = stratified_order(split, settings.seed)
    transform, images, used = pre.transform(), [], []
    for i in order:
        if len(images) == settings.calibration:
            break
        try:
            images.append(transform(load_image(split.root / split.items[i].relpath)).numpy())
            used.append(split.items[i].relpath)
        except BadImage:  # an unreadable image calibrates nothing; the next one in the order does
            continue
    folder.mkdir(parents=True, exist_ok=True)
    what = f"quantizing the trunk to int8 ({len(images)} calibration images, {settings.activations} activations"
    with (reporter or Reporter()).stage(what + f"{', reduce_range' if settings.reduce_range else ''})"):
        quantize.quantize(trunk, pre.input_shape, np.stack(images), settings, folder / quantize.MODEL_FILE)
    quantize.write_record(folder, settings, used, sha256_file(folder / quantize.MODEL_FILE))


def _load_int8(folder: Path, reporter) -> torch.nn.Module:
    from flowerfeat import quantize

    with (reporter or Reporter()).stage("loading the int8 trunk"):
        return runtime.OnnxModel(folder / quantize.MODEL_FILE)


def _on_device(t, cfg: ExtractConfig, engine: str, device, pre: Preprocessing, reporter) -> torch.nn.Module:
    """The trunk as ``engine`` runs it on ``device``: channels-last and compiled where asked."""
    if engine != "torch":
        with (reporter or Reporter()).stage(f"preparing the {engine} engine"):
            t = runtime.on_engine(t, engine, pre.input_shape)
    t = t.to(device)
    if cfg.channels_last:
        t = t.to(memory_format=torch.channels_last)
    if cfg.compile:  # pays on CUDA for large sets; compiles on the first batch (docs/benchmarks.md)
        t = torch.compile(t)
    return t


def _cache_engine(folder: Path, splits) -> str | None:
    """The engine that made the cache in ``folder`` (None: no readable file yet)."""
    for split in splits:
        try:
            return store.engine_of(store.read_meta(folder / f"{split}.h5"))
        except FlowerfeatError:
            continue
    return None


def library_versions(engine: str = "torch") -> dict:
    import h5py
    import torchvision

    versions = {
        "flowerfeat": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
    }
    if engine == "onnxruntime":
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    return versions


def split_meta(cfg: ExtractConfig, split: Split, setup: Setup) -> dict:
    """The self-description of one split's feature file, fingerprint included."""
    n_views = split_views(cfg, split)
    meta = {
        "format_version": FORMAT_VERSION,
        "split": split.name,
        "classes": list(split.classes),
        "model": setup.backbone.name,
        "layer": setup.cut.name,
        "feature_dim": setup.feature_dim,
        "cut_dropout": setup.cut.dropout,
        "weights": setup.weights.identity,
        "weights_sha256": setup.weights.sha256,
        "weights_path": setup.weights.path,  # where the file was, so predict and export find it again
        "preprocessing": setup.preprocessing.to_dict(),
        "precision": setup.precision,
        "engine": setup.engine,
        "quantization": setup.quantization.to_dict() if setup.quantization is not None else None,
        "quantized_model": None,  # set once the int8 trunk exists (extract_split)
        "decoder": setup.decoder,
        "dtype": cfg.dtype,
        "compression": cfg.compression,
        "views": n_views,
        "view_seed": cfg.view_seed if n_views else 0,
        "layout": split.layout,
        "test_fraction": split.test_fraction,
        "data_root": str(Path(split.root).resolve()),
        "library_versions": library_versions(setup.engine),
        "extract_config": cfg.to_dict(),
    }
    meta["model_key"] = store.model_key(meta)
    meta["fingerprint"] = store.fingerprint(meta, [(i.relpath, i.label, i.size, i.mtime_ns) for i in split.items])
    return meta


@dataclass(frozen=True)
class Previous:
    """The finished file a split's rows may be reused from."""

    path: Path | None
    meta: dict | None  # None: no file, or one that cannot be used (corrupt, unfinished, older format): rebuilt

    @classmethod
    def find(cls, final: Path) -> Previous:
        if not final.is_file():
            return cls(None, None)
        try:
            return cls(final, store.read_meta(final))
        except FlowerfeatError:
            return cls(final, None)


def _reusable_rows(prev: Previous, meta: dict, split: Split) -> tuple[dict[int, int], str, int]:
    """Rows of the previous file that stay valid (unit -> row), why the rest are (re)extracted, and how many of
    its rows are dropped because their images are gone or changed."""
    import h5py

    old = prev.meta
    if old is None:  # a corrupt or unfinished file is simply rebuilt
        return {}, "existing file unusable: rebuilding it" if prev.path else "", 0
    # Rows are keyed by (path, view, size, mtime): a different --views count still reuses the views both have.
    if old["model_key"] != meta["model_key"] or old["classes"] != meta["classes"]:
        return {}, "re-extracting: " + store.describe_difference(old, meta), 0
    with h5py.File(prev.path, "r") as f:
        paths = [p.decode() for p in f["paths"][...]]
        keys = zip(paths, f["views"][...].tolist(), f["file_sizes"][...].tolist(), f["file_mtimes_ns"][...].tolist())
        old_rows = {k: r for r, k in enumerate(keys)}
    nv = 1 + meta["views"]
    # Augmented views are only valid under the same seed; centre crops (view 0) always are.
    reusable_views = nv if old["view_seed"] == meta["view_seed"] else 1
    reuse = {}
    for idx, item in enumerate(split.items):
        for v in range(reusable_views):
            r = old_rows.get((item.relpath, v, item.size, item.mtime_ns))
            if r is not None:
                reuse[idx * nv + v] = r
    removed = len(old_rows) - len(reuse)
    if old["views"] != meta["views"]:
        return reuse, "views changed", removed
    if old.get("compression", "none") != meta["compression"]:
        return reuse, "compression changed: rewriting from cached rows", removed
    if len(reuse) == len(old_rows) == len(split.items) * nv:
        return reuse, "same images and settings, older fingerprint: rewriting from cached rows", 0
    return reuse, "image list changed", removed


@dataclass(frozen=True)
class WorkPlan:
    """One rank's share of a split: which units are reused, which batches it computes, where it resumes."""

    reuse: dict[int, int]  # unit -> row of the previous finished file
    batches: list[list[int]]  # this rank's batches of units, in order
    resume_at: int  # batches an earlier run of this rank already committed

    @property
    def remaining(self) -> list[list[int]]:
        return self.batches[self.resume_at :]

    @property
    def done_before(self) -> int:
        """Units already finished when this run starts: reused ones and committed batches."""
        return len(self.reuse) + sum(len(b) for b in self.batches[: self.resume_at])

    @property
    def total(self) -> int:
        return len(self.reuse) + sum(len(b) for b in self.batches)

    @property
    def computed(self) -> int:
        """Units this run sends through the trunk."""
        return sum(len(b) for b in self.remaining)


def plan_work(n_units: int, reuse: dict[int, int], batch_size: int, dist: Dist, committed: int = 0) -> WorkPlan:
    """Batches of the units not reused, interleaved over the ranks: the same batches for any number of ranks."""
    todo = [u for u in range(n_units) if u not in reuse]
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    return WorkPlan(reuse=reuse, batches=batches[dist.rank :: dist.world], resume_at=committed)


class _Writer:
    """Background thread that moves finished batches into the shard log, so the trunk never waits on disk."""

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


def make_loader(split: Split, n_views: int, view_seed: int, setup: Setup, batches: list[list[int]]):
    """Batches of (x or None, unit ids, skipped) for ``batches``, read by ``setup.workers`` processes; in the gpu and
    hybrid modes prepared on the device."""
    from torch.utils.data import DataLoader

    on_device = setup.mode != "cpu"  # JPEGs resized on the device (and, in gpu mode, decoded there)
    dataset_type = UnitDataset
    if on_device:
        from flowerfeat.gpudecode import DecodedUnitDataset, GpuPreprocess, RawUnitDataset, collate_raw

        dataset_type = DecodedUnitDataset if setup.mode == "hybrid" else RawUnitDataset
    dataset = dataset_type(split, n_views, setup.transform, setup.augment, view_seed)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=setup.workers,
        collate_fn=collate_raw if on_device else collate_units,
        pin_memory=setup.device.type == "cuda" and not on_device,  # GpuPreprocess pins what goes to the device
        # batches queued per reader: decoded ones are big (a 256-image batch of pixels ~90 MB of shared memory),
        # and readers that decode are many
        prefetch_factor=(4 if setup.mode == "gpu" else 2) if setup.workers else None,
    )
    if on_device:  # (x on device, unit ids, skipped) per batch, prepared on the device
        return GpuPreprocess(setup.device, setup.transform).batches(loader, PREP_THREADS)
    return loader


def run_batches(
    trunk,
    loader,
    writer: _Writer,
    device: torch.device,
    precision: str,
    channels_last: bool,
    on_batch: Callable[[int, float, float], None],
    pad_to: int = 0,
) -> tuple[float, float]:
    """The loop itself: (read wait, compute) seconds. ``loader`` yields (x or None, unit ids, skipped).

    On CUDA nothing here waits for the GPU: each batch's features are copied to pinned memory asynchronously and the
    writer thread waits for them, so the next batch is read and prepared while the trunk runs. A short batch (the
    last one, or one with skipped images) is padded to ``pad_to`` rows there, so cuDNN's benchmark mode does not
    re-tune every convolution for a new shape. "compute" is then the time spent issuing work, not GPU time.
    """
    read_s = compute_s = 0.0
    cuda = device.type == "cuda"
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            x, ids, skipped = next(it)
        except StopIteration:
            break
        t1 = time.perf_counter()
        ready = None
        if x is not None:
            n = x.shape[0]
            x = x.to(device, non_blocking=True)
            if cuda and n < pad_to:
                x = torch.cat([x, x.new_zeros((pad_to - n, *x.shape[1:]))])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = trunk_rows(trunk, x, precision)[:n]  # (B, D)
            if cuda:
                host = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
                host.copy_(y, non_blocking=True)
                y, ready = host, torch.cuda.Event()
                ready.record()
            else:
                y = y.cpu()
        else:  # every image of the batch was unreadable
            y = None
        t2 = time.perf_counter()
        writer.put(y, ids, skipped, ready)
        read_s += t1 - t0
        compute_s += t2 - t1
        on_batch(len(ids) + len(skipped), t1 - t0, t2 - t1)
    return read_s, compute_s


def extract_split(
    cfg: ExtractConfig,
    split: Split,
    setup: Setup,
    reporter: Reporter | None = None,
    dist: Dist = Dist(),
    calibrate_on: Split | None = None,
) -> SplitResult:
    """Bring ``<folder>/<split>.h5`` up to date: nothing if its fingerprint matches, else extract what is missing
    (an int8 trunk is calibrated on ``calibrate_on``, the run's training split, when it does not exist yet)."""
    t_start = time.perf_counter()
    final = setup.folder / f"{split.name}.h5"
    meta = split_meta(cfg, split, setup)
    prev = Previous.find(final)
    if prev.meta is not None and prev.meta.get("fingerprint") == meta["fingerprint"]:
        return SplitResult(
            split=split.name,
            path=final,
            status="up to date",
            reason="fingerprint matches",
            rows=store.count_rows(final),
            computed=0,
            skipped=store.read_skipped(final),
        )
    reuse, reason, removed = _reusable_rows(prev, meta, split)
    t_trunk = time.perf_counter()
    setup.get_trunk(calibrate_on)  # built (and its weights checked) before anything is written
    t_trunk = time.perf_counter() - t_trunk
    if setup.quantization is not None:
        meta["quantized_model"] = _int8_file(setup.folder)
    n_units = len(split.items) * (1 + meta["views"])
    partial_root = final.with_name(final.name + ".partial")
    header = _shard_header(meta, setup.batch_size, n_units - len(reuse), dist)
    log = store.ShardLog(partial_root / f"rank{dist.rank}of{dist.world}", header)
    plan = plan_work(n_units, reuse, setup.batch_size, dist, committed=log.batches)
    status = "resumed" if plan.resume_at else ("updated" if reuse else "extracted")
    if log.discarded:
        reason += f"; discarded {log.discarded}"
    result = SplitResult(split=split.name, path=final, status=status, reason=reason, rows=0, computed=plan.computed)
    result.reused, result.removed, result.done_before = len(reuse), removed, plan.done_before - len(reuse)
    result.trunk_s = t_trunk
    reporter = reporter or Reporter()
    if plan.resume_at or reuse:
        why = f" ({reason})" if reason else ""
        reporter.status(f"{split.name}: {plan.done_before:,} of {plan.total:,} images already done{why}")
    _run_plan(cfg, split, setup, plan, log, result, reporter)
    t_finish = time.perf_counter()
    dist.barrier()
    if dist.rank == 0:
        result.skipped, result.rows = _finish(final, prev.path, meta, split, reuse, partial_root, header, dist.world)
        shutil.rmtree(partial_root, ignore_errors=True)
    result.finish_s = time.perf_counter() - t_finish
    dist.barrier()
    result.seconds = time.perf_counter() - t_start
    return result


def _int8_file(folder: Path) -> dict:
    from flowerfeat import quantize

    return {"path": str((folder / quantize.MODEL_FILE).resolve()), "sha256": quantize.read_record(folder)["sha256"]}


def _shard_header(meta: dict, batch_size: int, todo: int, dist: Dist) -> dict:
    """What a shard log must match to be resumed: the same work, cut the same way, for the same rank."""
    return {
        "fingerprint": meta["fingerprint"],
        "feature_dim": meta["feature_dim"],
        "dtype": meta["dtype"],
        "batch_size": batch_size,
        "todo": todo,
        "world": dist.world,
        "rank": dist.rank,
    }


def _run_plan(cfg, split, setup: Setup, plan: WorkPlan, log, result: SplitResult, reporter: Reporter) -> None:
    """Compute this rank's remaining batches into ``log``, reporting progress; timings go into ``result``."""
    prog = Progress(split.name, plan.done_before, plan.total, start_done=plan.done_before)
    reporter.update(prog)
    t_loop = time.perf_counter()
    writer = _Writer(log)
    try:
        if plan.remaining:

            def on_batch(n, r, c):
                prog.done += n
                prog.read_s += r
                prog.compute_s += c
                prog.write_s = writer.write_s
                prog.loop_s = time.perf_counter() - t_loop
                reporter.update(prog)

            loader = make_loader(split, split_views(cfg, split), cfg.view_seed, setup, plan.remaining)
            result.read_s, result.compute_s = run_batches(
                setup.get_trunk(),
                loader,
                writer,
                setup.device,
                setup.precision,
                cfg.channels_last,
                on_batch,
                pad_to=setup.batch_size,
            )
    finally:
        writer.close()
    result.write_s = writer.write_s
    result.loop_s = prog.loop_s = time.perf_counter() - t_loop
    reporter.split_done(prog)


def split_views(cfg: ExtractConfig, split: Split) -> int:
    """Augmented views per image of ``split``: test splits always hold centre crops only."""
    return cfg.views if split.name == "train" else 0


class _Source(NamedTuple):
    """Where one finished row comes from: row ``row`` of shard ``shard``, or of the previous file (shard None)."""

    shard: int | None
    row: int


def _finish(final: Path, previous, meta: dict, split: Split, reuse: dict, partial_root: Path, header: dict, world):
    """Merge rows reused from ``previous`` and every rank's shard into the finished file, in unit order, with flat
    memory."""
    import h5py

    nv = 1 + meta["views"]
    sources = {u: _Source(None, r) for u, r in reuse.items()}
    shards, skipped_units = [], {}
    for rank in range(world):
        log = store.ShardLog(partial_root / f"rank{rank}of{world}", {**header, "rank": rank})
        rows, ids, skipped = log.read()
        log.close()
        shards.append(rows)
        sources.update((u, _Source(rank, i)) for i, u in enumerate(ids.tolist()))
        for u, why in skipped:
            skipped_units.setdefault(u // nv, why)
    order = sorted(sources)
    items = [split.items[u // nv] for u in order]
    columns = {
        "labels": [it.label for it in items],
        "paths": [it.relpath for it in items],
        "views": [u % nv for u in order],
        "file_sizes": [it.size for it in items],
        "file_mtimes_ns": [it.mtime_ns for it in items],
    }
    skipped = [
        (split.items[i].relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), why)
        for i, why in sorted(skipped_units.items())
    ]
    old = h5py.File(previous, "r") if reuse else None
    try:
        meta = {**meta, "created": _dt.datetime.now(_dt.timezone.utc).isoformat()}
        blocks = _row_blocks([sources[u] for u in order], shards, old, meta)
        store.write_feature_file(final, meta, len(order), blocks, columns, skipped)
    finally:
        if old is not None:
            old.close()
    return skipped, len(order)


def _row_blocks(sources: list[_Source], shards: list[np.ndarray], old, meta: dict, step: int = 1024):
    """Blocks of finished rows in order, (start, rows), each gathered with one fancy read per source."""
    dtype = np.dtype(meta["dtype"])
    for start in range(0, len(sources), step):
        part = sources[start : start + step]
        block = np.empty((len(part), meta["feature_dim"]), dtype)
        by_shard: dict[int | None, list[tuple[int, int]]] = {}  # shard -> [(position in block, row)]
        for k, s in enumerate(part):
            by_shard.setdefault(s.shard, []).append((k, s.row))
        for shard, pairs in by_shard.items():
            at, rows = (np.array(v, dtype=np.int64) for v in zip(*pairs))
            if shard is None:  # rows reused from the previous file; h5py wants increasing indices
                o = np.argsort(rows)
                block[at[o]] = old["features"][rows[o]]
            else:
                block[at] = shards[shard][rows]
        yield start, block


def run_extraction(
    cfg: ExtractConfig,
    reporter: Reporter | None = None,
    dist: Dist = Dist(),
    trunk: torch.nn.Module | None = None,
    splits: dict[str, Split] | None = None,
) -> list[SplitResult]:
    """Extract every split of ``cfg`` (or the ``splits`` given, already scanned: a subset, for benchmarks);
    ``trunk`` replaces the model's trunk (see ``resolve_setup``)."""
    reporter = reporter or Reporter()
    out = Path(cfg.out)
    store.check_writable(out)
    setup = resolve_setup(cfg, dist, trunk, reporter)  # an unknown model, cut or weights file stops here
    if splits is None:
        with reporter.stage(f"scanning {cfg.data}") as found:
            splits = scan_data(Path(cfg.data), cfg.splits, cfg.test_fraction)  # structural errors stop here
            found.append(" + ".join(f"{len(s.items):,} {name}" for name, s in splits.items()) + " images")
            found.append(f"{len(splits[cfg.splits[0]].classes)} classes")
    if setup.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest convolutions
    setup.folder.mkdir(parents=True, exist_ok=True)
    with store.exclusive_lock(setup.folder, f"features-rank{dist.rank}of{dist.world}"):
        calibrate_on = splits.get("train") or next(iter(splits.values()))
        results = [extract_split(cfg, split, setup, reporter, dist, calibrate_on) for split in splits.values()]
    if dist.rank == 0:
        store.mark_latest(out, setup.folder)  # what fit-head, report and predict pick by default
    return results


class Extraction(Mapping):
    """What ``extract`` made: a mapping split -> finished feature file, and each split's ``SplitResult``.

    Example::

        files = flowerfeat.extract("data/flower_photos")
        files["train"]                   # Path('data/features/.../train.h5')
        files.results["train"].status    # 'extracted', 'resumed', 'updated' or 'up to date'
    """

    def __init__(self, results: list[SplitResult]):
        self.results = {r.split: r for r in results}

    def __getitem__(self, split: str) -> Path:
        return self.results[split].path

    def __iter__(self):
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __repr__(self) -> str:
        return "Extraction(" + ", ".join(f"{s}={r.path} ({r.rows} rows)" for s, r in self.results.items()) + ")"


def extract(
    data: str | Path = ExtractConfig.data,
    out: str | Path = ExtractConfig.out,
    layer: str = ExtractConfig.layer,
    weights: str = ExtractConfig.weights,
    *,
    progress: bool | Reporter = False,
    trunk: torch.nn.Module | None = None,
    **options,
) -> Extraction:
    """Run a frozen trunk (``model``, VGG16 by default, cut at ``layer``) once over every split of ``data`` and cache
    the features in HDF5.

    ``options`` are ``ExtractConfig``'s other fields (``model``, ``splits``, ``batch_size``, ``views``, ``dtype``,
    ``device``, ...). Resumable and fingerprinted as ``flowerfeat features``: a second call with nothing changed
    does nothing, an interrupted one (Ctrl-C, a kernel interrupt) resumes at its last committed batch, unreadable
    images are skipped and recorded. ``progress=True`` prints plain progress lines to stderr; a ``Reporter`` gets
    every event. ``trunk`` stands in for the model's trunk (tests hand in a tiny network). Under torchrun each rank takes its
    share. Raises ``FlowerfeatError`` with a one-line message for bad input.

    Example::

        files = flowerfeat.extract("data/flower_photos", layer="pool5-gap", weights="vgg16_features.pth")
        files = flowerfeat.extract("data/flower_photos", model="resnet50")   # its pooled pre-logits
        tr = flowerfeat.load_features(files["train"])
    """
    fields = {f.name for f in dataclasses.fields(ExtractConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"extract() got unknown option(s) {', '.join(unknown)}; see flowerfeat.ExtractConfig")
    if isinstance(options.get("splits"), str):
        options["splits"] = (options["splits"],)
    cfg = ExtractConfig(data=Path(data), out=Path(out), layer=layer, weights=str(weights), **options)
    reporter = progress if isinstance(progress, Reporter) else LineReporter() if progress else Reporter()
    dist, shutdown = dist_from_env()
    try:
        return Extraction(run_extraction(cfg, reporter, dist, trunk))
    finally:
        shutdown()
