"""The typer CLI: parses and validates options, shows progress, and turns library errors into one-line messages.

The options of ``features`` and ``fit-head`` are generated from ExtractConfig's and FitConfig's fields (their name,
type, default, choices and help are declared once, in config.py), and the validated config is passed down."""

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

from flowerfeat.cli_options import config_option, config_options
from flowerfeat.config import PRECISIONS, ExtractConfig, FitConfig  # dataclasses: no torch

app = typer.Typer(
    help="Transfer learning on cached features of a frozen trunk (VGG16 by default): extract once, fit the head in "
    "a second, report.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode=None,  # help is plain text: "[onnx]" or "[timm]" stay as written
)

PICK_HELP = "Pick the {} of this {} (default: the latest)."
HEAD_HELP = "A head checkpoint, or a folder holding heads (the root of the caches: the head saved last, or --layer's)."


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


# ---------------------------------------------------------------------------------------------------------
# Commands


@command()
def download(
    out: Path = typer.Option(Path("data/flower_photos"), help="Where the train/test ImageFolder goes."),
    url: str = typer.Option(None, help="Archive URL (default: TensorFlow's flower_photos.tgz)."),
):
    """Download TensorFlow's flower_photos and split it into train/ and test/ (15% of each class test, by file-name
    hash).

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
@config_options(ExtractConfig)
def features(cfg: ExtractConfig):
    """Extract frozen-trunk features for every split into HDF5 (resumable; a second run with nothing changed does
    nothing).

    Example: flowerfeat features --data my_photos --weights vgg16.pth --layer pool5

    Another model: flowerfeat features --data my_photos --model timm:tf_efficientnet_lite0

    Many GPUs: torchrun --nproc-per-node 8 -m flowerfeat features ...
    """
    from flowerfeat import extraction

    _sigterm_to_interrupt()
    show = int(os.environ.get("RANK", "0")) == 0
    reporter = _extraction_reporter(show)
    try:
        with reporter:
            results = extraction.run(cfg, reporter)
    except KeyboardInterrupt:
        p = reporter.last
        where = f"{p.split} at {p.done}/{p.total} images" if p else "before the first batch"
        _fail(f"interrupted in {where}; finished batches are saved, rerun the same command to resume", 130)
    if show:
        _print_results(results, cfg.strict)


def _extraction_reporter(show: bool):
    """Progress for this process: a Rich bar on a terminal, plain lines in a log (stderr not a terminal), nothing on
    torchrun's other ranks."""
    from flowerfeat.progress import BarReporter, LineReporter, Reporter

    if not show:
        return Reporter()
    return BarReporter() if sys.stderr.isatty() else LineReporter()


def _print_results(results, strict: bool) -> None:
    """One line per split, then every skipped image; exit 1 under --strict when any was skipped."""
    from flowerfeat import store
    from flowerfeat.progress import reading_note, result_line

    skipped = []
    for r in results:
        typer.echo(result_line(r))
        skipped += [(r.split, p, why) for p, why in r.skipped]
    made = [r for r in results if r.computed]
    if made and (note := reading_note(made, store.read_meta(made[0].path).get("decoder", ""))):
        typer.echo(note, err=True)
    if skipped:
        typer.echo(
            f"warning: {len(skipped)} unreadable image(s) skipped (listed in each file's 'skipped' dataset):", err=True
        )
        for s, p, why in skipped:
            typer.echo(f"  {s}: {p}: {why}", err=True)
        if strict:
            raise typer.Exit(1)


@command("fit-head")
@config_options(FitConfig)
def fit_head(
    cfg: FitConfig,
    model: Optional[str] = typer.Option(None, help=PICK_HELP.format("training features", "model")),
    layer: Optional[str] = typer.Option(None, help=PICK_HELP.format("training features", "cut")),
):
    """Train the replacement linear layer on cached features and save a self-sufficient checkpoint.

    Example: flowerfeat fit-head --epochs 2 --layer pool5
    """
    from flowerfeat import heads, store, train

    cfg = cfg.replace(features=store.find_features(cfg.features, "train", layer, model))
    where = heads.destination(cfg)  # refused before any work when it would replace a head unasked
    again = where.exists() and not (cfg.out or cfg.name)  # its default name: the same settings on the same features
    t = time.perf_counter()
    head = train.fit_config(cfg, log=typer.echo)
    seconds = time.perf_counter() - t  # all of it: reading, the start, the epochs
    out = head.save(where)
    typer.echo(
        f"Saved head to {out} ({head.model} {head.layer}, {head.weight.shape[1]}-d, {len(head.classes)} classes, "
        f"fitted on {cfg.features} in {seconds:.2f} s)"
        + ("; the same settings on the same features as the head that was there: the same head again" if again else "")
    )


@command()
def report(
    features: Optional[Path] = typer.Option(
        None, help="Test features (file or folder); default: the test.h5 beside the head's training features."
    ),
    head: Path = typer.Option(ExtractConfig.out, help=HEAD_HELP),
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
    from flowerfeat import store

    fitted = flowerfeat.Head.load(store.find_head(head, layer, model))
    ev = flowerfeat.evaluate(fitted, features)
    typer.echo(fitted.source_line(), err=as_json)  # which head answers
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
    head: Path = typer.Option(ExtractConfig.out, help=HEAD_HELP),
    model: Optional[str] = typer.Option(None, help=PICK_HELP.format("head fitted on features", "model")),
    layer: Optional[str] = typer.Option(None, help=PICK_HELP.format("head fitted on features", "cut")),
    weights: Optional[str] = typer.Option(None, help="Trunk weights (default: those the head's features came from)."),
    top_k: int = typer.Option(1, help="Classes to show per image."),
    output: Optional[Path] = typer.Option(None, help="Also write the predictions to a .csv or .json file."),
    batch_size: int = config_option(ExtractConfig, "batch_size"),
    device: str = config_option(ExtractConfig, "device"),
    engine: Optional[Literal[ExtractConfig.__dataclass_fields__["engine"].metadata["choices"]]] = typer.Option(
        None, help="What runs the trunk (default: the engine the head's features were made with, where installed)."
    ),
    precision: Optional[Literal[PRECISIONS[1:]]] = typer.Option(
        None, help="fp32 (as exported models compute), bf16 or int8 (default: as the head's features were made)."
    ),
):
    """Classify new images with the trunk and the trained head: one line per image (path, class, probability).

    Example: flowerfeat predict my_photos/ --top-k 3 --output predictions.csv
    """
    import flowerfeat
    from flowerfeat import store
    from flowerfeat.predict import prepare_output, write_predictions

    if top_k < 1:
        _fail(f"--top-k must be >= 1, got {top_k}")
    if output is not None:
        prepare_output(output)
    clf = flowerfeat.Classifier.load(store.find_head(head, layer, model), weights, device, engine, precision)
    typer.echo(clf.head.source_line(), err=output is not None)  # which head answers
    for note in clf.notes:
        typer.echo(note, err=True)
    for p in (preds := clf.predict(list(paths), top_k, batch_size)):
        if p.error:
            typer.echo(f"warning: skipped {p.path}: {p.error}", err=True)
        else:
            typer.echo(f"{p.path}: " + ", ".join(f"{c} {q:.3f}" for c, q in p.top))
    if output is not None:
        write_predictions(preds, output)
        typer.echo(f"wrote {output}", err=True)
    if all(p.error for p in preds):
        _fail(f"none of the {len(preds)} image(s) could be read; nothing was classified", 1)


@command()
def export(
    out: Path = typer.Argument(..., help="Output file: .pth (torchvision), .pt2 (torch.export) or .onnx."),
    format: Literal["auto", "torchvision", "pt2", "onnx"] = typer.Option(
        "auto", help="auto (by OUT's suffix), torchvision (heads on the model's own last layer's rows), pt2 or onnx."
    ),
    head: Path = typer.Option(ExtractConfig.out, help=HEAD_HELP),
    model: Optional[str] = typer.Option(None, help=PICK_HELP.format("head fitted on features", "model")),
    layer: Optional[str] = typer.Option(None, help=PICK_HELP.format("head fitted on features", "cut")),
    weights: Optional[str] = typer.Option(None, help="Trunk weights (default: those the head's features came from)."),
):
    """Export the trunk and the trained layer as one model that runs without flowerfeat, plus OUT.json (classes,
    preprocessing, how to load it).

    Example: flowerfeat export data/runs/flowers.pt2 --layer pool5-gap
    """
    from flowerfeat import store
    from flowerfeat.export import export_model
    from flowerfeat.heads import Head

    fitted = Head.load(store.find_head(head, layer, model))
    done = export_model(fitted, out, format, weights)
    typer.echo(fitted.source_line())  # which head was exported
    typer.echo(f"wrote {done.model} ({done.format}) and {done.sidecar}")


@command()
def bench(
    data: Path = config_option(ExtractConfig, "data", help="ImageFolder to time on."),
    model: Optional[List[str]] = typer.Option(
        None, help="MODEL or MODEL@LAYER (repeatable): the first gets the whole bench, the others their engines "
        f"side by side; default {ExtractConfig.model}.",
    ),
    weights: Optional[List[str]] = typer.Option(
        None, help="Weights for every model (imagenet, none or a PATH), or MODEL=PATH per model (repeatable)."
    ),
    layer: Optional[str] = typer.Option(None, help="The first model's layer (or say MODEL@LAYER)."),
    limit: int = typer.Option(64, help="Images to use (80% train, 20% test, spread over the classes)."),
    batch_size: int = config_option(ExtractConfig, "batch_size"),
    workers: Optional[int] = config_option(ExtractConfig, "workers"),
    precision: Literal[PRECISIONS] = config_option(ExtractConfig, "precision"),
    engine: Literal[ExtractConfig.__dataclass_fields__["engine"].metadata["choices"]] = config_option(
        ExtractConfig, "engine", help="flowerfeat's engine for (c); every installed one is timed."
    ),
    agreement_images: int = typer.Option(8, help="Images for the bf16-vs-fp32 feature agreement (0 skips it)."),
):
    """Time the textbook loop, a naive extraction loop and flowerfeat on the same images, then other models side by
    side; print the ratios.

    Example: flowerfeat bench --data my_photos --model vgg16@pool5 --model timm:tf_efficientnet_lite0 --limit 200
    """
    from flowerfeat.bench import model_configs, run_bench

    if limit < 10:
        _fail(f"--limit must be >= 10, got {limit}")
    base = ExtractConfig(data=data, batch_size=batch_size, workers=workers, precision=precision, engine=engine)
    cfgs = model_configs(base, model or [ExtractConfig.model], weights or [], layer)
    run_bench(cfgs[0], limit, agreement_images, log=typer.echo, others=tuple(cfgs[1:]))


@command(resumable=True)
def compare(
    data: Path = config_option(ExtractConfig, "data"),
    model: Optional[List[str]] = typer.Option(
        None, metavar="MODEL[@LAYER]", help="A candidate (repeatable); default: vgg16 and one small member of each "
        "family users reach for next (each family suggests its own).",
    ),
    weights: Optional[List[str]] = typer.Option(
        None, metavar="MODEL=PATH", help="Local weights for a model (repeatable); a bare PATH with one --model."
    ),
    sample: int = typer.Option(500, help="Training images to measure on (stratified, seeded; all when fewer)."),
    folds: int = typer.Option(5, help="Cross-validation folds (stratified, seeded; the same for every candidate)."),
    seed: int = typer.Option(0, help="Seed of the sample, the folds and the heads."),
    out: Path = typer.Option(Path("data/compare"), help="Where the candidates' sample features are cached."),
    test_fraction: float = config_option(
        ExtractConfig, "test_fraction", help="As for features: the share of a folder without test/ that is held out."
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
    plain = [w for w in weights or [] if "=" not in w]
    if plain and (len(model or []) != 1 or len(weights) > 1):
        _fail("--weights takes MODEL=PATH, e.g. --weights vgg16=vgg16_conv.pth (a bare PATH only with one --model)")
    pairs = {model[0]: plain[0]} if plain else dict(w.partition("=")[::2] for w in weights or [])
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
    pattern: Optional[str] = typer.Argument(
        None, help="Only names matching this shell pattern, e.g. 'resnet*'; a family's prefix lists that family's "
        "members, e.g. 'timm:*lite*'.",
    ),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the list as JSON."),
):
    """List the models --model takes: each one's cuts (name and dimension), GFLOPs (multiply-adds per image), ImageNet
    top-1 where the weights' metadata give it, and whether its weights load offline; each row as soon as it is read.

    Example: flowerfeat models 'efficientnet*'; flowerfeat models 'timm:*lite*'
    """
    from flowerfeat import catalogue as cat

    rows = cat.remembered(pattern)  # what the last listing computed, when still true: printed at once
    if not as_json:
        typer.echo(cat.HEADER)
    if rows is None:
        rows = []
        for row in cat.catalogue(pattern):  # each row as soon as it is read
            rows.append(row)
            if not as_json:
                typer.echo(cat.catalogue_line(row))
        cat.remember(pattern, rows)
    elif not as_json:
        typer.echo("\n".join(cat.catalogue_line(row) for row in rows))
    typer.echo(json.dumps(rows, indent=2) if as_json else cat.footer(len(rows)))


@command()
def runs(
    out: Path = typer.Option(ExtractConfig.out, help="The root of the caches (features' --out)."),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the inventory as JSON."),
):
    """List what is on disk: each data set's caches (model, cut, rows per split, when) and the heads fitted on each,
    with their test (or validation) accuracy; 0.2's layout too.

    Example: flowerfeat runs --out data/features
    """
    from flowerfeat.runs import as_dicts, inventory, runs_lines

    caches, old_heads = inventory(out)
    listing = json.dumps(as_dicts(caches, old_heads), indent=2) if as_json else "\n".join(runs_lines(caches, old_heads))
    typer.echo(listing)


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
