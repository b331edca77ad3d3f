"""The typer CLI: parses and validates options, shows progress, and turns library errors into one-line messages."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import List, Literal, Optional

import typer

from flowerfeat import config as choices  # the choices of each option, declared once there
from flowerfeat.config import AUTO_BATCH_SIZE, RUNS_DIR, ExtractConfig, FitConfig  # dataclasses: no torch

app = typer.Typer(
    help="Transfer learning on cached features of a frozen trunk (VGG16 by default): extract once, fit the head in "
    "a second, report.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

MODEL_HELP = (
    "vgg16 (the textbook's), any torchvision classification model (resnet50, efficientnet_b0, convnext_tiny, "
    "vit_b_16, ...) or timm:<name> (the [timm] extra); `flowerfeat models` lists them."
)
LAYER_HELP = (
    "Where the model is cut (default: its first cut): vgg16 fc7 (4096-d), fc6 (4096-d), pool5 (25088-d) or "
    "pool5-gap (512-d); other models pre-logits (and pool for some CNNs)."
)
PICK_HELP = "Pick the {} of this {} (default: the latest)."
DATA_HELP = (
    "Images: a folder with train/<class>/ and test/<class>/, a folder of <class>/ folders (with --test-fraction), "
    "or a CSV of path,label rows (paths relative to the CSV)."
)
FEATURES_HELP = "A feature file, a cache folder, or the root of the caches (then the latest extraction, or --layer's)."
HEAD_HELP = "A head checkpoint, or a folder of them (then the latest saved, or --layer's)."
ENGINE_HELP = (
    "What runs the trunk on a CPU: torch, onnxruntime (the [onnx] extra), or auto (the cache's engine, else "
    "onnxruntime where installed, else torch)."
)
WEIGHTS_HELP = (
    "imagenet (the model's published weights; VGG16: torchvision IMAGENET1K_V1), a local state-dict PATH in the "
    "model's own key names, or none (random init)."
)


def _fail(message: str, code: int = 2):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def command(*args, resumable: bool = False, **kwargs):
    """app.command that turns FlowerfeatError into `error: ...` + exit 2, and Ctrl-C into exit 130.

    Only a resumable command (features) promises that rerunning it picks up where an OSError stopped it.
    """

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            from flowerfeat.errors import FlowerfeatError

            try:
                return fn(*a, **k)
            except FlowerfeatError as e:
                _fail(str(e))
            except KeyboardInterrupt:
                _fail("interrupted", 130)
            except OSError as e:  # disk full, permissions, a vanished file: finished work is kept
                where = f"{e.filename}: " if e.filename else ""
                then = "finished batches are saved, fix this and rerun to resume" if resumable else "fix this and rerun"
                _fail(f"{where}{e.strerror or e}; {then}", 1)

        return app.command(*args, **kwargs)(inner)

    return wrap


def _sigterm_to_interrupt():
    """SIGTERM (a job scheduler's stop) takes the same clean path as Ctrl-C."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


@command()
def download(
    out: Path = typer.Option(Path("data/flower_photos"), help="Where the train/test ImageFolder goes."),
    url: str = typer.Option(None, help="Archive URL (default: TensorFlow's flower_photos.tgz)."),
):
    """Download TensorFlow's flower_photos and split it into train/ and test/ (15% of each class test, by file-name hash).

    Example: flowerfeat download --out data/flower_photos
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from flowerfeat.download import FLOWERS_BYTES, FLOWERS_URL, download_flowers

    with Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True
    ) as bar:
        task = bar.add_task("flower_photos.tgz", total=None)
        counts = download_flowers(
            out,
            url or FLOWERS_URL,
            FLOWERS_BYTES if url is None else None,
            on_bytes=lambda d, t: bar.update(task, completed=d, total=t or None),
        )
    typer.echo(f"{out}: {counts['train']} train and {counts['test']} test images")


@command(resumable=True)
def features(
    data: Path = typer.Option(ExtractConfig.data, help=DATA_HELP),
    out: Path = typer.Option(ExtractConfig.out, help="Root of the caches: <out>/<model>-<layer>-<weights>/<split>.h5."),
    model: str = typer.Option(ExtractConfig.model, metavar="MODEL", help=MODEL_HELP),
    layer: Optional[str] = typer.Option(ExtractConfig.layer, metavar="LAYER", help=LAYER_HELP),
    weights: str = typer.Option(ExtractConfig.weights, help=WEIGHTS_HELP),
    split: Optional[List[str]] = typer.Option(
        None, help=f"Split(s) to extract (repeatable); default {' and '.join(ExtractConfig.splits)}."
    ),
    test_fraction: float = typer.Option(
        ExtractConfig.test_fraction,
        help="Carve a test split of this fraction out of data without one (flat <class>/ folders, train/ alone, a "
        "CSV without a split column); stratified, by file name.",
    ),
    batch_size: int = typer.Option(
        ExtractConfig.batch_size,
        help=f"Images per trunk batch; 0 = auto ({AUTO_BATCH_SIZE['cpu']} on CPU, {AUTO_BATCH_SIZE['cuda']} on CUDA).",
    ),
    workers: Optional[int] = typer.Option(
        ExtractConfig.workers, help="Reader processes beside the trunk; default: auto (README, section GPUs)."
    ),
    decode: Literal[choices.DECODES] = typer.Option(
        ExtractConfig.decode,
        help="auto (gpu on CUDA, else cpu), cpu (PIL in the workers), gpu (nvjpeg: batched JPEG decode on the device) "
        "or hybrid (JPEG decode in the workers, PIL's pixels; resize on the device).",
    ),
    precision: Literal[choices.PRECISIONS] = typer.Option(
        ExtractConfig.precision,
        help="auto, fp32, bf16 or int8 (auto: bf16 on CUDA or CPUs with native bf16; int8: a quantized trunk on "
        "the CPU, the [onnx] extra).",
    ),
    dtype: Literal[choices.DTYPES] = typer.Option(ExtractConfig.dtype, help="Storage dtype of the features: float32 or float16."),
    compression: Literal[choices.COMPRESSIONS] = typer.Option(
        ExtractConfig.compression, help="HDF5 filter for the features: none, lzf or gzip (pays for sparse pool5)."
    ),
    views: int = typer.Option(
        ExtractConfig.views, help="Extra augmented views per training image (RandomResizedCrop + flip, seeded)."
    ),
    view_seed: int = typer.Option(ExtractConfig.view_seed, help="Seed of the augmented views."),
    device: str = typer.Option(ExtractConfig.device, help="auto, cpu, cuda or cuda:N."),
    strict: bool = typer.Option(ExtractConfig.strict, "--strict", metavar="", help="Exit 1 when any image was skipped as unreadable."),
    compile: bool = typer.Option(
        ExtractConfig.compile,
        "--compile", metavar="",
        help="torch.compile the trunk (compiling costs seconds, so for large image sets on CUDA).",
    ),
    engine: Literal[choices.ENGINE_CHOICES] = typer.Option(ExtractConfig.engine, help=ENGINE_HELP),
    calibration: int = typer.Option(
        ExtractConfig.calibration, help="--precision int8: training images (a seeded, stratified sample) that calibrate the quantized trunk."
    ),
):
    """Extract frozen-trunk features for every split into HDF5 (resumable; a second run with nothing changed does nothing).

    Example: flowerfeat features --data my_photos --weights vgg16.pth --layer pool5
    Another model: flowerfeat features --data my_photos --model timm:tf_efficientnet_lite0
    Many GPUs: torchrun --nproc-per-node 8 -m flowerfeat features ...
    """
    import flowerfeat

    options = dict(model=model, splits=tuple(split or ExtractConfig.splits), test_fraction=test_fraction)
    options.update(batch_size=batch_size, workers=workers)
    options.update(precision=precision, dtype=dtype, compression=compression, views=views, view_seed=view_seed)
    options.update(device=device, decode=decode, strict=strict, compile=compile, engine=engine, calibration=calibration)
    ExtractConfig(**options)  # every option checked before the reporter starts
    _sigterm_to_interrupt()
    show = int(os.environ.get("RANK", "0")) == 0
    reporter = _extraction_reporter(show)
    try:
        with reporter:
            files = flowerfeat.extract(data, out, layer, weights, progress=reporter, **options)
    except KeyboardInterrupt:
        p = reporter.last
        where = f"{p.split} at {p.done}/{p.total} images" if p else "before the first batch"
        _fail(f"interrupted in {where}; finished batches are saved, rerun the same command to resume", 130)
    if show:
        _print_results(files.results.values(), strict)


def _extraction_reporter(show: bool):
    """Progress for this process: a Rich bar on a terminal, plain lines in a log (stderr not a terminal), nothing on
    torchrun's other ranks."""
    from flowerfeat.progress import BarReporter, LineReporter, Reporter

    if not show:
        return Reporter()
    return BarReporter() if sys.stderr.isatty() else LineReporter()


def _print_results(results, strict: bool) -> None:
    """One line per split, then every skipped image; exit 1 under --strict when any was skipped."""
    skipped = []
    for r in results:
        typer.echo(_result_line(r))
        skipped += [(r.split, p, why) for p, why in r.skipped]
    if skipped:
        typer.echo(
            f"warning: {len(skipped)} unreadable image(s) skipped (listed in each file's 'skipped' dataset):", err=True
        )
        for s, p, why in skipped:
            typer.echo(f"  {s}: {p}: {why}", err=True)
        if strict:
            raise typer.Exit(1)


def _result_line(r) -> str:
    """What happened to one split, in words: ``train: 44 extracted, 10 skipped -> .../train.h5 (44 rows) ...``."""
    if r.status == "up to date":
        return f"{r.split}: up to date, {r.rows:,} rows in {r.path}"
    counts = [f"{r.rows - r.reused:,} extracted"]
    counts += [
        f"{n:,} {what}" for n, what in ((len(r.skipped), "skipped"), (r.reused, "reused"), (r.removed, "removed")) if n
    ]
    if r.done_before:
        counts.append(f"resumed after {r.done_before:,}")
    rate = f", {r.computed / r.loop_s:.2f} images/s" if r.loop_s and r.computed else ""
    why = f" ({r.reason})" if r.reason else ""
    return (
        f"{r.split}: {', '.join(counts)} -> {r.path} ({r.rows:,} rows) in {r.seconds:.1f} s{rate}{why}; "
        f"waiting on reads {r.read_s:.1f} s, compute {r.compute_s:.1f} s, writes {r.write_s:.1f} s, "
        f"finishing the file {r.finish_s:.1f} s"
    )


@command("fit-head")
def fit_head(
    features: Path = typer.Option(FitConfig.features, help=FEATURES_HELP),
    model: Optional[str] = typer.Option(None, help=PICK_HELP.format("training features", "model")),
    layer: Optional[str] = typer.Option(None, help=PICK_HELP.format("training features", "cut")),
    out: Optional[Path] = typer.Option(
        FitConfig.out, help=f"Where the head goes; default {RUNS_DIR}/<the features' folder>/head.pt."
    ),
    epochs: int = typer.Option(FitConfig.epochs, help="Passes over the training features."),
    batch_size: int = typer.Option(FitConfig.batch_size, help="Mini-batch size (the textbook's 20)."),
    optimizer: Literal[choices.OPTIMIZERS] = typer.Option(FitConfig.optimizer, help="adam or sgd (the textbook's, with --lr 0.001)."),
    lr: float = typer.Option(
        FitConfig.lr, help="Learning rate (peak with --schedule cosine); 0 = auto from the features' scale."
    ),
    momentum: float = typer.Option(FitConfig.momentum, help="SGD momentum (the textbook: 0)."),
    schedule: Literal[choices.SCHEDULES] = typer.Option(
        FitConfig.schedule, help="cosine (decays to 0 over the run) or constant (the textbook's)."
    ),
    init: Literal[choices.INITS] = typer.Option(
        FitConfig.init,
        help="ridge (start at the regularised least-squares fit), class-means, or random (the textbook).",
    ),
    weight_decay: float = typer.Option(FitConfig.weight_decay, help="L2 weight decay."),
    dropout: Optional[float] = typer.Option(
        FitConfig.dropout,
        help="Dropout before the layer; default: VGG16's own at that layer (0.5 at fc6/fc7, 0 at pool5).",
    ),
    average: int = typer.Option(
        FitConfig.average, help="Runs averaged into the head, each over another shuffle (k times the training time)."
    ),
    solver: Literal[choices.SOLVERS] = typer.Option(
        FitConfig.solver, help="sgd (mini-batch, uses --optimizer) or lbfgs (full-batch logistic regression)."
    ),
    c: float = typer.Option(FitConfig.C, "--C", help="Inverse L2 strength for --solver lbfgs."),
    val_fraction: float = typer.Option(
        FitConfig.val_fraction, help="Hold out this fraction of training images (stratified); keep the best epoch."
    ),
    seed: int = typer.Option(
        FitConfig.seed, help="Seed for init, shuffling and dropout: same seed, bit-identical head."
    ),
    max_memory: float = typer.Option(FitConfig.max_memory, help="GiB; larger feature files are streamed from disk."),
):
    """Train the replacement linear layer on cached features and save a self-sufficient checkpoint.

    Example: flowerfeat fit-head --epochs 2 --layer pool5
    """
    import flowerfeat
    from flowerfeat.store import find_features
    from flowerfeat.heads import default_head_path

    options = dict(batch_size=batch_size, optimizer=optimizer, lr=lr, momentum=momentum, schedule=schedule)
    options.update(init=init, weight_decay=weight_decay, dropout=dropout, average=average, solver=solver, C=c)
    options.update(val_fraction=val_fraction, seed=seed, max_memory=max_memory)
    FitConfig(epochs=epochs, **options)  # every option checked before the features are read
    train_file = find_features(features, "train", layer, model)
    fit = flowerfeat.fit_head  # imported before the clock starts
    t = time.perf_counter()
    head = fit(train_file, epochs, log=typer.echo, **options)
    seconds = time.perf_counter() - t  # all of it: reading, the start, the epochs
    out = head.save(out or default_head_path(train_file))
    typer.echo(
        f"Saved head to {out} ({head.model} {head.layer}, {head.weight.shape[1]}-d, {len(head.classes)} classes, fitted on "
        f"{train_file} in {seconds:.2f} s)"
    )


@command()
def report(
    features: Optional[Path] = typer.Option(
        None, help="Test features (file or folder); default: the test.h5 beside the head's training features."
    ),
    head: Path = typer.Option(RUNS_DIR, help=HEAD_HELP),
    model: Optional[str] = typer.Option(None, help=PICK_HELP.format("head fitted on features", "model")),
    layer: Optional[str] = typer.Option(None, help=PICK_HELP.format("head fitted on features", "cut")),
    figures: Optional[Path] = typer.Option(None, help="Write confusion_matrix.png and samples.png here."),
    errors: Optional[Path] = typer.Option(None, help="Write the misclassified test images to this CSV."),
    as_json: bool = typer.Option(
        False, "--json", metavar="", help="Print the metrics as JSON (with averages, provenance, misclassified images)."
    ),
):
    """Per-class and overall test accuracy in the textbook's format, then a confusion matrix.

    Example: flowerfeat report --layer pool5 --figures data/runs/figures
    """
    import flowerfeat
    from flowerfeat import report as rep
    from flowerfeat.heads import find_head

    ev = flowerfeat.evaluate(find_head(head, layer, model), features)
    if as_json:
        typer.echo(json.dumps(ev.to_dict(), indent=2))
    else:
        typer.echo("\n".join([str(ev), ""] + rep.confusion_lines(ev) + [""] + rep.confused_lines(ev)))
    if errors is not None:
        typer.echo(f"wrote {rep.write_errors(ev, errors)} ({len(rep.mistakes(ev))} misclassified)", err=as_json)
    if figures is not None:
        for p in rep.write_figures(ev, figures):
            typer.echo(f"wrote {p}", err=as_json)


@command()
def predict(
    paths: List[Path] = typer.Argument(..., help="Image files or folders of images."),
    head: Path = typer.Option(RUNS_DIR, help=HEAD_HELP),
    model: Optional[str] = typer.Option(None, help=PICK_HELP.format("head fitted on features", "model")),
    layer: Optional[str] = typer.Option(None, help=PICK_HELP.format("head fitted on features", "cut")),
    weights: Optional[str] = typer.Option(None, help="Trunk weights (default: those the head's features came from)."),
    top_k: int = typer.Option(1, help="Classes to show per image."),
    output: Optional[Path] = typer.Option(None, help="Also write the predictions to a .csv or .json file."),
    batch_size: int = typer.Option(ExtractConfig.batch_size, help="Images per trunk batch; 0 = auto, as for features."),
    device: str = typer.Option(ExtractConfig.device, help="auto, cpu, cuda or cuda:N."),
    engine: Literal[choices.ENGINE_CHOICES] = typer.Option("auto", help="As for features; auto: the engine the head's features were made with."),
    precision: Literal[choices.PRECISIONS] = typer.Option(
        "auto", help="auto (as the head's features were made), fp32 (as exported models compute) or bf16."
    ),
):
    """Classify new images with the trunk and the trained head: one line per image (path, class, probability).

    Example: flowerfeat predict my_photos/ --top-k 3 --output predictions.csv
    """
    import flowerfeat
    from flowerfeat.predict import prepare_output, write_predictions
    from flowerfeat.heads import find_head

    if top_k < 1:
        _fail(f"--top-k must be >= 1, got {top_k}")
    if output is not None:
        prepare_output(output)
    clf = flowerfeat.Classifier.load(find_head(head, layer, model), weights, device, engine, precision)
    for p in (preds := clf.predict(list(paths), top_k, batch_size)):
        if p.error:
            typer.echo(f"warning: skipped {p.path}: {p.error}", err=True)
        else:
            typer.echo(f"{p.path}: " + ", ".join(f"{c} {q:.3f}" for c, q in p.top))
    if output is not None:
        write_predictions(preds, output)
        typer.echo(f"wrote {output}", err=True)


@command()
def export(
    out: Path = typer.Argument(..., help="Output file: .pth (torchvision), .pt2 (torch.export) or .onnx."),
    format: Literal[choices.EXPORT_FORMATS] = typer.Option("auto", help="auto (by OUT's suffix), torchvision (fc7 heads), pt2 or onnx."),
    head: Path = typer.Option(RUNS_DIR, help=HEAD_HELP),
    model: Optional[str] = typer.Option(None, help=PICK_HELP.format("head fitted on features", "model")),
    layer: Optional[str] = typer.Option(None, help=PICK_HELP.format("head fitted on features", "cut")),
    weights: Optional[str] = typer.Option(None, help="Trunk weights (default: those the head's features came from)."),
):
    """Export the trunk and the trained layer as one model that runs without flowerfeat, plus OUT.json (classes,
    preprocessing, how to load it).

    Example: flowerfeat export data/runs/flowers.pt2 --layer pool5-gap
    """
    from flowerfeat.export import export_model
    from flowerfeat.heads import find_head

    done = export_model(find_head(head, layer, model), out, format, weights)
    typer.echo(f"wrote {done.model} ({done.format}) and {done.sidecar}")


@command()
def bench(
    data: Path = typer.Option(ExtractConfig.data, help="ImageFolder to time on."),
    model: Optional[List[str]] = typer.Option(
        None, help="MODEL or MODEL@LAYER (repeatable): the first gets the whole bench, the others their engines "
        f"side by side; default {ExtractConfig.model}.",
    ),
    weights: Optional[List[str]] = typer.Option(
        None, help="Weights for every model (" + WEIGHTS_HELP.rstrip(".") + "), or MODEL=PATH per model (repeatable)."
    ),
    layer: Optional[str] = typer.Option(None, help="The first model's layer (or say MODEL@LAYER)."),
    limit: int = typer.Option(64, help="Images to use (80% train, 20% test, spread over the classes)."),
    batch_size: int = typer.Option(
        ExtractConfig.batch_size, help="flowerfeat's batch size; 0 = auto (the naive and textbook loops use 20)."
    ),
    workers: Optional[int] = typer.Option(ExtractConfig.workers, help="flowerfeat's reader processes; default: auto."),
    precision: Literal[choices.PRECISIONS] = typer.Option(ExtractConfig.precision, help="flowerfeat's precision: auto, fp32 or bf16."),
    engine: Literal[choices.ENGINE_CHOICES] = typer.Option(ExtractConfig.engine, help="flowerfeat's engine for (c); every installed one is timed."),
    agreement_images: int = typer.Option(8, help="Images for the bf16-vs-fp32 feature agreement (0 skips it)."),
):
    """Time the textbook loop, a naive extraction loop and flowerfeat on the same images, then other models side by
    side; print the ratios.

    Example: flowerfeat bench --data my_photos --model vgg16@pool5 --model timm:tf_efficientnet_lite0 --limit 200
    """
    from flowerfeat.bench import run_bench

    if limit < 10:
        _fail(f"--limit must be >= 10, got {limit}")
    base = ExtractConfig(data=data, batch_size=batch_size, workers=workers, precision=precision, engine=engine)
    cfgs = model_configs(base, model or [ExtractConfig.model], weights or [], layer)
    run_bench(cfgs[0], limit, agreement_images, log=typer.echo, others=tuple(cfgs[1:]))


def model_configs(base: ExtractConfig, choices: list[str], weights: list[str], layer: str | None = None):
    """One ExtractConfig per ``MODEL[@LAYER]``, with its weights from ``MODEL=PATH`` (or one value for all)."""
    from flowerfeat.backbones import parse_choice

    per_model, common = {}, ExtractConfig.weights
    for w in weights:
        name, sep, path = w.partition("=")
        if sep:
            per_model[name] = path
        else:
            common = w
    cfgs = []
    for k, choice in enumerate(choices):
        name, cut = parse_choice(choice)
        cfgs.append(base.replace(model=name, layer=cut or (layer if k == 0 else None), weights=per_model.get(name, common)))
    unknown = sorted(set(per_model) - {c.model for c in cfgs})
    if unknown:
        _fail(f"--weights {unknown[0]}=...: no --model {unknown[0]} to give them to")
    return cfgs


@command(resumable=True)
def compare(
    data: Path = typer.Option(ExtractConfig.data, help=DATA_HELP),
    model: Optional[List[str]] = typer.Option(
        None, metavar="MODEL[@LAYER]", help="A candidate (repeatable); default: vgg16, resnet50, efficientnet_b0, "
        "convnext_tiny, timm:tf_efficientnet_lite0.",
    ),
    weights: Optional[List[str]] = typer.Option(None, metavar="MODEL=PATH", help="Local weights for a model (repeatable)."),
    sample: int = typer.Option(500, help="Training images to measure on (stratified, seeded; all when fewer)."),
    folds: int = typer.Option(5, help="Cross-validation folds (stratified, seeded; the same for every candidate)."),
    seed: int = typer.Option(0, help="Seed of the sample, the folds and the heads."),
    out: Path = typer.Option(Path("data/compare"), help="Where the candidates' sample features are cached."),
    test_fraction: float = typer.Option(
        ExtractConfig.test_fraction, help="As for features: the share of a folder without test/ that is held out."
    ),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the comparison as JSON."),
    figure: Optional[Path] = typer.Option(None, help="Write accuracy against images/s, the front drawn, to this PNG."),
):
    """Which model for my photos: each candidate's features of a sample of your training images, the same
    cross-validation folds for all, the default head's and a converged probe's accuracy beside the images/s measured
    here, and the accuracy-versus-speed front. A rerun reuses the cached features; a larger --sample adds to them.

    Example: flowerfeat compare --data my_photos --model vgg16@pool5-gap --model resnet50 --weights vgg16=conv.pth
    """
    from flowerfeat import comparison as cmp

    if sample < 10 or folds < 2:
        _fail(f"--sample must be >= 10 and --folds >= 2, got {sample} and {folds}")
    pairs = dict(w.partition("=")[::2] for w in weights or [])
    if any(not v for v in pairs.values()):
        _fail("--weights takes MODEL=PATH, e.g. --weights vgg16=vgg16_conv.pth")
    _sigterm_to_interrupt()
    reporter = _extraction_reporter(True)
    with reporter:
        result = cmp.compare(data, model or [], pairs, sample=sample, folds=folds, seed=seed, out=out,
                             progress=reporter, test_fraction=test_fraction)  # fmt: skip
    typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else "\n".join(cmp.table_lines(result)))
    if figure is not None:
        figure.parent.mkdir(parents=True, exist_ok=True)
        cmp.figure(result).savefig(figure, dpi=120)
        typer.echo(f"wrote {figure}", err=as_json)


@command()
def models(
    pattern: Optional[str] = typer.Argument(None, help="Only names matching this shell pattern, e.g. 'resnet*'."),
    timm: bool = typer.Option(False, "--timm", metavar="", help="List timm's models (with PATTERN: those it matches)."),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the list as JSON."),
):
    """List the models --model takes: each one's cuts (name and dimension), GFLOPs (multiply-adds per image), ImageNet
    top-1 where the weights' metadata give it, and whether its weights load offline.

    Example: flowerfeat models 'efficientnet*'; flowerfeat models --timm '*lite*'
    """
    from flowerfeat.catalogue import catalogue, catalogue_lines

    rows = catalogue(pattern, timm=timm)
    typer.echo(json.dumps(rows, indent=2) if as_json else "\n".join(catalogue_lines(rows)))


def _print_version(value: bool):
    if value:
        from flowerfeat import __version__

        typer.echo(f"flowerfeat {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", metavar="", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
):
    """Transfer learning on cached features of a frozen trunk (VGG16 by default): extract once, fit the head in a
    second, report."""


def main():
    app()
