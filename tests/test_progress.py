"""Progress reporting: a time-based rate and ETA from the first batch, plain lines throttled for logs."""

from __future__ import annotations

import io

from flowerfeat.progress import LineReporter, Progress, duration, progress_line


def test_rate_and_eta_count_this_run_only():
    p = Progress("train", done=480, total=2569, start_done=400, loop_s=20.0)  # resumed at 400: 80 images in 20 s
    assert p.rate == 4.0 and p.eta_s == (2569 - 480) / 4.0
    assert Progress("train", 400, 2569, start_done=400).rate is None  # nothing measured yet: no made-up ETA
    assert progress_line(p) == "train: 480/2,569 images (18 %), 4.00 images/s, ETA 8 min 42 s"
    assert [duration(s) for s in (None, 12.4, 245, 3720)] == ["?", "12 s", "4 min 05 s", "1 h 02 min"]


def test_line_reporter_prints_at_most_every_ten_seconds_and_at_each_split_end():
    now = [0.0]
    out = io.StringIO()
    rep = LineReporter(out, every_s=10, clock=lambda: now[0])
    with rep.stage("scanning data") as found:
        found.append("3 images")
    for t in range(31):  # a batch a second
        now[0] = float(t)
        rep.update(Progress("train", done=4 * (t + 1), total=200, loop_s=t + 1.0))
    rep.split_done(Progress("train", done=200, total=200, loop_s=50.0))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("scanning data: 3 images (")
    assert [s.split(" images")[0] for s in lines[1:-1]] == [
        "train: 4/200",
        "train: 44/200",
        "train: 84/200",
        "train: 124/200",
    ]
    assert lines[-1] == "train: 200/200 images (100 %), 4.00 images/s, ETA 0 s in 50 s"


def test_a_failed_step_says_nothing():
    out = io.StringIO()
    rep = LineReporter(out)
    try:
        with rep.stage("loading weights"):
            raise ValueError("bad file")
    except ValueError:
        pass
    assert out.getvalue() == ""  # the error, printed by the caller, stays the only line


def test_a_loop_bound_by_reading_names_draft_decoding_once():
    from types import SimpleNamespace

    from flowerfeat.progress import reading_note

    def split(loop_s, read_s, computed=100):
        return SimpleNamespace(loop_s=loop_s, read_s=read_s, computed=computed)

    large = [split(40.0, 30.0), split(11.5, 3.4), split(0.0, 0.0, computed=0)]  # the last one was up to date
    note = reading_note(large, "pil")
    assert note.startswith("note: the trunk waited on reading for 65% of the loop (33 of 52 s)")
    assert "--decode draft" in note
    assert reading_note(large, "pil-draft") is None  # already drafting
    assert reading_note([split(40.0, 4.0)], "pil") is None  # the trunk is the cost
    assert reading_note([split(6.0, 5.0)], "pil") is None  # too short to matter
