"""What an extraction works out once for all its splits: the recipe, the cache folder, how the loop runs (device,
decode mode, batch size, readers), and the trunk, built on first use."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowerfeat import FORMAT_VERSION, __version__, fastest, runtime, store
from flowerfeat.backbones import Backbone
from flowerfeat.config import ExtractConfig, batch_size_for
from flowerfeat.data import Split
from flowerfeat.errors import FlowerfeatError
from flowerfeat.extraction.shards import Dist
from flowerfeat.progress import Reporter
from flowerfeat.recipe import History, Recipe, Trunk, build, decode_plan, resolve
from flowerfeat.weights import WeightsInfo


# Reader threads beside a CPU trunk (2-core Intel AMX, Lite0 on onnxruntime fp32; docs/benchmarks.md, "Threads"): on
# the shared 224-pixel photos 2 threads read as fast as 1 (162.7 and 161.7 images/s against 163.3 and 161.8), on
# 1,344-pixel photos 1.36x faster (67.5 against 49.6; 3: 66.2): a second thread decodes while the trunk waits.
CPU_READERS = 2


def default_workers(mode: str, device: torch.device) -> int:
    """Readers when --workers is not given: CPU_READERS threads beside a CPU trunk; on CUDA, DataLoader
    processes, 8 that only read JPEG bytes (gpu) or all the cores this rank can have but two, up to 32, that decode
    (cpu, hybrid). torchrun's ranks on one node share its cores."""
    if device.type != "cuda":
        return CPU_READERS
    cores = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, cores) if mode == "gpu" else min(32, cores - 2))


@dataclass
class Job:
    """One extraction's resolved plan, shared by its splits."""

    cfg: ExtractConfig
    recipe: Recipe
    folder: Path  # the cache folder: <out>/<data set>/<model>-<cut>-<weights tag>
    device: torch.device
    mode: str  # decode mode: cpu, gpu or hybrid
    batch_size: int
    workers: int
    reporter: Reporter
    built: Trunk | None = None
    choose_engine: bool = False  # auto's engine and precision are chosen by measuring (fastest.py), in the folder

    def settle_engine(self, measure: bool = True) -> None:
        """On a new cache on a CPU: the engine and precision that run this model fastest here (a
        kept measurement, or one made now in the cache folder, its trunk kept for the run)."""
        if self.choose_engine:
            self.recipe, self.built = fastest.choose(
                self.recipe, self.folder, self.reporter, self.cfg.channels_last, measure
            )  # fmt: skip
            self.choose_engine = False

    def trunk(self, calibrate_on: Split | None = None) -> Trunk:
        """The trunk, built on the first call (an up-to-date run never loads weights); an int8 trunk is kept in the
        cache folder, made first when it is not there, calibrated on ``calibrate_on`` (the run's training split)."""
        if self.built is None:
            keep = calibration = None
            if self.recipe.engine == "onnxruntime":  # its engine file is kept in the cache folder
                keep = store.engine_files(self.folder, self.recipe.precision)
            if self.recipe.precision == "int8":
                from flowerfeat import quantize

                q = self.recipe.quantization
                if calibrate_on is not None:
                    sample = (calibrate_on, self.recipe.preprocessing, q["calibration"], q["seed"])
                    calibration = functools.partial(quantize.calibration_sample, *sample)
            self.built = build(
                self.recipe, self.device, keep=keep, calibration=calibration, channels_last=self.cfg.channels_last,
                compile=self.cfg.compile, reporter=self.reporter,
            )  # fmt: skip
            if self.recipe.precision == "int8" and (note := quantize.slower_note(keep.read_record())):
                self.reporter.status(note)
        return self.built

    def engine_file_lost(self) -> str | None:
        """The kept engine file's name when it is missing, damaged or made otherwise (it is made again on the
        next build); None when the recipe runs none or it is intact."""
        if self.recipe.engine != "onnxruntime":
            return None
        from flowerfeat.recipe import onnx_settings

        keep = store.engine_files(self.folder, self.recipe.precision)
        settings = self.recipe.quantization if self.recipe.precision == "int8" else onnx_settings(self.recipe)
        return None if keep.intact(settings) else keep.model.name


def cache_folder(cfg: ExtractConfig, backbone: Backbone, cut: str, weights: WeightsInfo) -> Path:
    return store.cache_dir(cfg.out, cfg.data, backbone.folder_name, cut, weights.tag)


def _history(folder: Path) -> History:
    """What the cache in ``folder`` already holds: its engine and precision (None: no readable file yet), its int8
    record."""
    engine = precision = None
    for file in store.split_files(folder):
        try:
            meta = store.read_meta(file)
            engine, precision = store.engine_of(meta), meta.get("precision")
            break
        except FlowerfeatError:
            continue
    record = store.engine_files(folder, "int8").read_record()
    return History(engine, record["settings"] if record else None, precision)


def make_job(cfg: ExtractConfig, dist: Dist, reporter: Reporter) -> Job:
    """Resolve everything ``cfg`` leaves open, once; nothing is loaded yet (an unknown model, cut or weights file
    is refused here, before anything is written)."""
    device = runtime.resolve_device(cfg.device)
    if dist.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.rank % torch.cuda.device_count())
    read = []  # the cache's history, read once: resolve's, and whether auto's engine is chosen by measuring

    def history(backbone: Backbone, cut: str, weights: WeightsInfo) -> History:
        read.append(_history(cache_folder(cfg, backbone, cut, weights)))
        return read[-1]

    recipe = resolve(cfg, device, history)
    mode = decode_plan(cfg.decode, device)[0]
    workers = cfg.workers if cfg.workers is not None else default_workers(mode, device)
    folder = cache_folder(cfg, recipe.backbone, recipe.layer, recipe.weights)
    choose = fastest.needed(cfg.engine, cfg.precision, device, read[-1].engine)
    batch = batch_size_for(device.type, cfg.batch_size)
    return Job(cfg, recipe, folder, device, mode, batch, workers, reporter, choose_engine=choose)


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


def split_views(cfg: ExtractConfig, split: Split) -> int:
    """Augmented views per image of ``split``: test splits always hold centre crops only."""
    return cfg.views if split.name == "train" else 0


def split_meta(job: Job, split: Split) -> dict:
    """The self-description of one split's feature file: the recipe, how the split was made and stored, the
    fingerprint."""
    cfg, n_views = job.cfg, split_views(job.cfg, split)
    meta = {
        "format_version": FORMAT_VERSION,
        "split": split.name,
        "classes": list(split.classes),
        **job.recipe.to_attrs(),
        "compression": cfg.compression,
        "views": n_views,
        "view_seed": cfg.view_seed if n_views else 0,
        "view_scale": cfg.view_scale if n_views else None,
        "layout": split.layout,
        "test_fraction": split.test_fraction,
        "data_root": str(Path(split.root).resolve()),
        "library_versions": library_versions(job.recipe.engine),
        "extract_config": cfg.to_dict(),
    }
    meta["model_key"] = store.model_key(meta)
    meta["fingerprint"] = store.fingerprint(meta, [(i.relpath, i.label, i.size, i.mtime_ns) for i in split.items])
    return meta
