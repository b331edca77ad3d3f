"""Progress of long jobs: plain lines for logs, notebooks and scripts; a Rich bar on a terminal."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass


@dataclass
class Progress:
    """Where one split's extraction stands, after each batch (and once at its start)."""

    split: str
    done: int  # units finished, including those of earlier (resumed) runs and reused rows
    total: int
    start_done: int = 0  # units already finished when this run started
    read_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0
    loop_s: float = 0.0  # wall time since this run's first batch was asked for

    @property
    def rate(self) -> float | None:
        """Images per second in this run, from the first batch on (None before it)."""
        new = self.done - self.start_done
        return new / self.loop_s if new and self.loop_s > 0 else None

    @property
    def eta_s(self) -> float | None:
        """Seconds left at this run's rate so far (None before the first batch)."""
        return (self.total - self.done) / self.rate if self.rate else None


def duration(seconds: float | None) -> str:
    """12 s, 4 min 05 s, 1 h 02 min; '?' when unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def progress_line(p: Progress) -> str:
    """``train: 480/2,569 images (19 %), 3.71 images/s, ETA 9 min 23 s``."""
    pct = f" ({100 * p.done // max(p.total, 1)} %)"
    rate = f", {p.rate:.2f} images/s, ETA {duration(p.eta_s)}" if p.rate else ""
    return f"{p.split}: {p.done:,}/{p.total:,} images{pct}{rate}"


class Reporter:
    """Receives what a long job is doing. This one keeps only the last progress (for an interrupt's message);
    subclasses show it.

    Example::

        class Percent(flowerfeat.Reporter):
            def update(self, p):
                print(f"{p.split} {100 * p.done // p.total} %")

        flowerfeat.extract("data/flower_photos", progress=Percent())
    """

    last: Progress | None = None

    def __enter__(self):  # a reporter that draws (a bar) does so while it is entered
        return self

    def __exit__(self, *exc):
        return False

    @contextlib.contextmanager
    def stage(self, doing: str):
        """Around a step that takes a moment (``scanning data/flower_photos``): ``begin`` says what is happening,
        then, if the step succeeds, one status line says what it found (the step appends to the yielded list) and how
        long it took. A step that fails says nothing, so an error stays one line."""
        t = time.perf_counter()
        self.begin(doing)
        found: list[str] = []
        yield found
        self.status(f"{doing}: {', '.join(found) or 'done'} ({time.perf_counter() - t:.1f} s)")

    def begin(self, doing: str) -> None:
        """A step starts (a terminal shows it while it runs; logs wait for its outcome)."""

    def status(self, message: str) -> None:
        """What the job did or is about to do, e.g. ``train: resuming at 480 of 2,569 images``."""

    def update(self, p: Progress) -> None:
        """After each batch of a split (and once when the split starts)."""
        self.last = p

    def split_done(self, p: Progress) -> None:
        """When a split's rows are all computed."""
        self.last = p


class LineReporter(Reporter):
    """Plain lines to ``stream`` (stderr by default): each status, progress at most every ``every_s`` seconds, and a
    line at each split's end; for logs (nohup, SLURM, ``> log 2>&1``) and notebooks.

    Example::

        flowerfeat.extract("data/flower_photos", progress=flowerfeat.LineReporter(sys.stdout, every_s=60))
    """

    def __init__(self, stream=None, every_s: float = 10.0, clock=time.monotonic):
        self.stream, self.every_s, self.clock = stream, every_s, clock
        self._next = 0.0

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stderr, flush=True)

    def status(self, message: str) -> None:
        self._print(message)

    def update(self, p: Progress) -> None:
        super().update(p)
        now = self.clock()
        if p.rate and now >= self._next:  # the first line after the first batch, then every every_s
            self._print(progress_line(p))
            self._next = now + self.every_s

    def split_done(self, p: Progress) -> None:
        super().split_done(p)
        self._print(progress_line(p) + f" in {duration(p.loop_s)}")
        self._next = 0.0


class BarReporter(Reporter):
    """A Rich progress bar on stderr (for a terminal): one bar per split with images/s and a time-based ETA, and
    the start-up steps named while they run. Drawn while entered (``with BarReporter() as r: ...``)."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
        from rich.progress import Progress as Bar

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}")]  # fmt: skip
        self.bar = Bar(*columns, console=Console(stderr=True), transient=True)
        self.tasks: dict[str, int] = {}
        self.step = None  # the task showing the step under way

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def begin(self, doing: str) -> None:
        self.step = self.bar.add_task(doing, total=None, rate="")

    def status(self, message: str) -> None:
        if self.step is not None:
            self.bar.remove_task(self.step)
            self.step = None
        self.bar.console.print(message, highlight=False)

    def update(self, p: Progress) -> None:
        super().update(p)
        if p.split not in self.tasks:
            self.tasks[p.split] = self.bar.add_task(p.split, total=p.total, rate="")
        rate = f"{p.rate:.2f} images/s, ETA {duration(p.eta_s)}" if p.rate else "starting"
        self.bar.update(self.tasks[p.split], completed=p.done, rate=rate)


def result_line(r) -> str:
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


# The trunk waited on reading for this share of a long enough loop: the photos cost more to decode than to run
# (Lite0 on the 2-core Intel AMX machine, two reader threads: 4 % on the shared 224-pixel photos, 28 % on 1,344-pixel
# ones, which --decode draft reads 2x faster).
READ_BOUND_SHARE, READ_BOUND_MIN_S = 0.2, 10.0


def reading_note(results, decoder: str) -> str | None:
    """One line where the extraction loop waited on full JPEG decoding for a large share of its time, naming
    ``--decode draft`` (large photos read about 2x faster; docs/benchmarks.md, "Large photos"); else None."""
    loop = sum(r.loop_s for r in results if r.computed)
    read = sum(r.read_s for r in results if r.computed)
    if decoder != "pil" or loop < READ_BOUND_MIN_S or read < READ_BOUND_SHARE * loop:
        return None
    return (f"note: the trunk waited on reading for {read / loop:.0%} of the loop ({read:.0f} of {loop:.0f} s); for "
            "photos much larger than the model's input, --decode draft decodes JPEGs at a reduced scale (about 2x "
            "faster on 1,344-pixel photos, rows within cosine 0.99; docs/benchmarks.md, \"Large photos\")")  # fmt: skip
