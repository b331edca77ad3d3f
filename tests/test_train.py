"""Fitting the head: it learns, it is seeded, it streams, and its checkpoint is self-sufficient and safe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowerfeat import rows as rows_mod
from flowerfeat import heads, train
from flowerfeat.config import FitConfig
from flowerfeat.errors import FlowerfeatError
from conftest import blobs, write_features


@pytest.fixture
def train_file(tmp_path):
    x, y = blobs(60, spread=2.0)
    return write_features(tmp_path / "train.h5", x, y)


def test_head_learns_well_above_chance(tmp_path):
    x, y = blobs(300, spread=2.0)
    lines = []
    result, meta = train.fit(FitConfig(features=write_features(tmp_path / "t.h5", x, y), epochs=2), log=lines.append)
    assert result.weight.shape == (3, 16)
    x2, y2 = blobs(50, spread=2.0, seed=0, noise_seed=1)  # held-out: the same centres, other points
    _, pred, _ = heads.score(heads.LinearHead.of(result.weight, result.bias), x2, y2)
    assert (pred == y2).mean() > 0.8  # chance is 1/3
    # 900 rows / 20 = 45 batches per epoch: running-loss lines at batches 20 and 40, then the summary
    assert lines[0].startswith("Settings: dropout 0.5 (vgg16 fc7 features: its own classifier drops out 0.5") and "mean L1 norm" in lines[0]
    assert lines[1] == "Start: the ridge fit (regularised least squares)"
    assert [s[:20] for s in lines[2:5]] == ["Epoch 1, Batch 20 lo", "Epoch 1, Batch 40 lo", "Epoch 1 done: train "]


def test_running_loss_lines_use_the_textbook_format(train_file):
    lines = []
    train.fit(FitConfig(features=train_file, epochs=1, batch_size=2, log_every=20), log=lines.append)
    batch_lines = [s for s in lines if "Batch" in s]
    assert batch_lines[0].startswith("Epoch 1, Batch 20 loss: ") and len(batch_lines) == 90 // 20
    assert len(batch_lines[0].split("loss: ")[1]) == 18  # %.16f


def test_same_seed_bit_identical_other_seed_differs(train_file):
    a, _ = train.fit(FitConfig(features=train_file, seed=3))
    b, _ = train.fit(FitConfig(features=train_file, seed=3))
    c, _ = train.fit(FitConfig(features=train_file, seed=4))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)


def test_textbook_sgd_is_reachable_and_slower_to_converge(tmp_path):
    x, y = blobs(300, dim=64, spread=3.0)
    path = write_features(tmp_path / "t.h5", 0.05 * x, y)  # small features: SGD's steps scale with them, Adam's don't
    textbook = dict(optimizer="sgd", lr=0.001, schedule="constant", init="random", dropout=0.5, average=1)
    sgd, _ = train.fit(FitConfig(features=path, **textbook))
    adam, _ = train.fit(FitConfig(features=path))
    assert sgd.metrics["train_loss"] > adam.metrics["train_loss"] + 0.2  # SGD barely leaves ln(3)


def test_streamed_training_equals_in_memory(tmp_path, monkeypatch):
    x, y = blobs(400, dim=64)
    path = write_features(tmp_path / "train.h5", x, y)
    monkeypatch.setattr(rows_mod, "WINDOW_BYTES", 64 * 4 * 300)  # windows of 300 rows, so streaming has 4 windows
    mem, _ = train.fit(FitConfig(features=path, epochs=2))
    streamed, _ = train.fit(FitConfig(features=path, epochs=2, max_memory=1e-6))
    assert streamed.metrics["streamed"] and not mem.metrics["streamed"]
    assert torch.equal(mem.weight, streamed.weight) and torch.equal(mem.bias, streamed.bias)


def test_epoch_windows_cover_every_row_once():
    rows = np.concatenate(list(rows_mod.epoch_windows(1000, 64, 300, seed=1, epoch=1)))
    assert sorted(rows.tolist()) == list(range(1000))
    assert rows.tolist() != list(range(1000))


def test_auto_learning_rate_follows_the_feature_scale(tmp_path):
    x, y = blobs(40, dim=32)
    x = np.abs(x)
    small = train.fit(FitConfig(features=write_features(tmp_path / "a.h5", x, y)))[0].metrics["lr"]
    big = train.fit(FitConfig(features=write_features(tmp_path / "b.h5", 10 * x, y)))[0].metrics["lr"]
    assert small == pytest.approx(train.AUTO_LOGIT_STEP / np.abs(x).sum(1).mean(), rel=1e-4)
    assert big == pytest.approx(small / 10, rel=1e-4)
    assert train.fit(FitConfig(features=tmp_path / "a.h5", lr=0.01))[0].metrics["lr"] == 0.01


def test_lbfgs_solver_and_validation_split(train_file):
    lines = []
    res, _ = train.fit(FitConfig(features=train_file, solver="lbfgs", C=1.0, val_fraction=0.2), log=lines.append)
    assert res.metrics["val_rows"] == 36 and res.metrics["train_rows"] == 144
    assert res.metrics["train_acc"] > 0.9 and res.metrics["val_acc"] > 0.8
    assert lines[0].startswith("Validation: --val-fraction 0.2 of the training images (36 rows)")
    assert "L-BFGS done" in lines[1]


def test_validation_keeps_the_best_epoch(train_file):
    lines = []
    res, _ = train.fit(FitConfig(features=train_file, epochs=4, val_fraction=0.25, average=1), log=lines.append)
    accs = [h["val_acc"] for h in res.history]
    assert res.metrics["best_epoch"] == 1 + int(np.argmax(accs)) and res.metrics["val_acc"] == max(accs)
    assert any(s.startswith("Kept epoch") for s in lines)


def test_validation_split_is_stratified_and_keeps_views_together():
    labels = np.repeat([0, 1], 40)
    paths = np.array([f"img{i // 2}" for i in range(80)])  # two views per image
    mask = rows_mod.split_validation(labels, paths, 0.25, seed=0)
    assert mask[labels == 0].sum() == mask[labels == 1].sum() == 10
    assert all(mask[i] == mask[i + 1] for i in range(0, 80, 2))


def test_checkpoint_round_trip_without_pickle(train_file, tmp_path):
    cfg = FitConfig(features=train_file)
    res, meta = train.fit(cfg)
    train.Head.from_fit(res, meta, cfg).save(tmp_path / "head.pt")
    blob = torch.load(tmp_path / "head.pt", weights_only=True)  # loads with code execution off
    assert set(blob) == {"weight", "bias", "meta"}
    ck = train.Head.load(tmp_path / "head.pt")
    assert torch.equal(ck.weight, res.weight) and ck.classes == ["a", "b", "c"]
    assert ck.meta["features"]["fingerprint"] == meta["fingerprint"] and ck.meta["config"]["epochs"] == 2
    assert not list(tmp_path.glob(".head*tmp*"))


def test_corrupt_checkpoint_is_refused(tmp_path):
    (tmp_path / "head.pt").write_bytes(b"garbage")
    with pytest.raises(FlowerfeatError, match="not a flowerfeat head checkpoint"):
        train.Head.load(tmp_path / "head.pt")


def test_features_from_another_layer_are_refused(train_file, tmp_path):
    cfg = FitConfig(features=train_file)
    res, meta = train.fit(cfg)
    train.Head.from_fit(res, meta, cfg).save(tmp_path / "head.pt")
    x, y = blobs(5)
    other = write_features(tmp_path / "test.h5", x, y, layer="fc6")
    from flowerfeat import store

    with pytest.raises(FlowerfeatError, match="features do not match head.*layer fc7 vs fc6"):
        heads.check_compatible(train.Head.load(tmp_path / "head.pt"), store.read_meta(other), other)


def test_head_from_before_the_decoder_field_gets_a_clear_refusal(train_file, tmp_path):
    # a checkpoint saved before feature files named their decoder lacks the key: a one-line refusal, not a KeyError
    cfg = FitConfig(features=train_file)
    res, meta = train.fit(cfg)
    train.Head.from_fit(res, meta, cfg).save(tmp_path / "head.pt")
    ck = train.Head.load(tmp_path / "head.pt")
    del ck.meta["features"]["decoder"]
    from flowerfeat import store

    with pytest.raises(FlowerfeatError, match="features do not match head.*decoder None vs pil"):
        heads.check_compatible(ck, store.read_meta(train_file), train_file)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(epochs=0), r"epochs \(--epochs\) must be > 0"),
        (dict(lr=-1.0), r"lr \(--lr\) must be >= 0"),
        (dict(optimizer="rmsprop"), "unknown optimizer"),
        (dict(val_fraction=1.5), "--val-fraction"),
    ],
)
def test_bad_fit_settings_are_refused(change, message):
    with pytest.raises(FlowerfeatError, match=message):
        FitConfig(**change)


def test_streamed_training_memory_stays_flat_as_n_grows(tmp_path, monkeypatch):
    import tracemalloc

    monkeypatch.setattr(rows_mod, "WINDOW_BYTES", 512 * 4 * 128)  # windows of 128 rows of 512-d
    peaks, sizes = [], []
    for n in (200, 3000, 12000):  # the first run only warms up imports and caches
        x, y = blobs(n // 2, dim=512, n_classes=2)
        path = write_features(tmp_path / f"f{n}.h5", x, y, classes=("a", "b"))
        sizes.append(path.stat().st_size)
        tracemalloc.start()
        res, _ = train.fit(FitConfig(features=path, epochs=1, max_memory=1e-6))  # force streaming
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert res.metrics["streamed"]
    # memory ~ one window + one HDF5 chunk (1 MiB), whatever N: 4x the rows, about the same peak
    assert sizes[2] > 3.9 * sizes[1]
    assert peaks[2] < 1.3 * peaks[1] and peaks[2] < sizes[2] / 4, (peaks, sizes)


@pytest.mark.parametrize("layer, dropout", [("fc7", 0.5), ("fc6", 0.5), ("pool5", 0.0), ("pool5-gap", 0.0)])
def test_the_settings_follow_the_features_and_are_recorded(tmp_path, layer, dropout):
    x, y = blobs(20, dim=64)
    path = write_features(tmp_path / "t.h5", np.abs(x), y, layer=layer)
    lines = []
    head = train.fit_head(path, epochs=1, log=lines.append)
    chosen = head.metrics["chosen"]
    assert head.metrics["dropout"] == dropout and head.metrics["average"] == 1
    assert chosen["dropout"].startswith(f"vgg16 {layer} features: its own classifier ") and "mean L1 norm" in chosen["lr"]
    record = {"model": "vgg16", "layer": layer, "feature_dim": 64, "cut_dropout": dropout}
    assert lines[0] == train.choose(FitConfig(), record, np.abs(x).sum(1).mean(), 60).line()
    asked = train.fit_head(path, epochs=1, dropout=0.2, average=2)
    assert asked.metrics["chosen"]["dropout"] == "as asked" and asked.metrics["dropout"] == 0.2
    assert len(asked.meta["history"]) == 2 and asked.metrics["chosen"]["average"].startswith("2 runs")


def test_features_that_outnumber_the_rows_start_from_the_ridge_fit_and_step_gently(tmp_path):
    # 60 rows of 400 sparse dims (the flat pool5 case) vs 600 rows of 16 dense dims (pool5-gap's)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    sparse = np.maximum(rng.normal(0, 1, (60, 400)) + 0.8 * (np.arange(400) % 3 == y[:, None]), 0) * (
        rng.random((60, 400)) < 0.3
    )
    wide = train.fit_head(write_features(tmp_path / "w.h5", sparse.astype(np.float32), y, layer="pool5"), epochs=2)
    x, y2 = blobs(200, dim=16)
    narrow = train.fit_head(write_features(tmp_path / "n.h5", np.abs(x), y2, layer="pool5-gap"), epochs=2)
    l1 = np.abs(sparse).sum(1).mean()
    assert wide.metrics["lr"] == pytest.approx(train.AUTO_LOGIT_STEP / l1 * 60 / 400, rel=1e-4)
    assert "x 60 rows / 400 features: small steps from the ridge start" in wide.metrics["chosen"]["lr"] and wide.metrics["train_acc"] == 1.0
    assert narrow.metrics["lr"] == pytest.approx(train.AUTO_LOGIT_STEP / np.abs(x).sum(1).mean(), rel=1e-4)
    assert "rows /" not in narrow.metrics["chosen"]["lr"] and narrow.metrics["dropout"] == 0.0


def test_the_ridge_start_is_the_least_squares_fit_in_either_form(tmp_path):
    x, y = blobs(30, dim=40)
    rows = rows_mod.Rows(write_features(tmp_path / "t.h5", x, y), 4.0)
    mask = np.ones(rows.n, bool)
    means, _ = rows.stats(mask, 3)
    primal = train.ridge_start(rows, mask, 3, means)  # 90 rows >= 40 dims
    rows.dim = 10**6  # pretend the features outnumber the rows: the dual (N x N) form
    dual = train.ridge_start(rows, mask, 3, means)
    rows.close()
    torch.testing.assert_close(dual[0], primal[0], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(dual[1], primal[1], rtol=1e-3, atol=1e-4)
    assert (torch.from_numpy(x) @ primal[0].T + primal[1]).argmax(1).eq(torch.from_numpy(y)).float().mean() > 0.95


def test_an_averaged_head_is_the_mean_of_its_runs_and_run_0_is_the_single_run(train_file):
    one = train.fit_head(train_file, average=1, dropout=0.5)
    three = train.fit_head(train_file, average=3, dropout=0.5)
    assert [h["run"] for h in three.meta["history"]] == [0, 0, 1, 1, 2, 2]
    cfg = FitConfig(features=train_file, dropout=0.5, average=3).settled()
    rows = rows_mod.Rows(train_file, cfg.max_memory)
    hold = rows_mod.holdout(rows, cfg)  # no validation: no row held out
    means, mean_l1 = rows.stats(~hold.mask, 3)
    chosen = train.choose(cfg, rows.meta, mean_l1, rows.n)
    start = train.ridge_start(rows, ~hold.mask, 3, means)
    quiet = lambda s: None  # noqa: E731
    runs = [train._sgd_run(cfg, chosen, rows, hold, means, run, quiet, quiet, start) for run in range(3)]
    rows.close()
    assert torch.equal(runs[0].weight, one.weight)  # run 0 draws what a single run draws
    assert not torch.equal(runs[1].weight, runs[0].weight)  # the others shuffle differently
    torch.testing.assert_close(three.weight, torch.stack([r.weight for r in runs]).mean(0), rtol=0, atol=0)


@pytest.mark.parametrize(
    "n, fraction, message",
    [
        (2, 0.1, r"--val-fraction 0.1 holds out 1 of 6 training images; .* each of the 3 classes on each side: use 0.5"),
        (1, 0.5, r"--val-fraction 0.5 holds out 2 of 3 training images"),
    ],
)
def test_a_validation_fraction_that_cannot_split_says_so_in_its_own_words(tmp_path, n, fraction, message):
    x, y = blobs(n, dim=4)
    path = write_features(tmp_path / "t.h5", x, y)
    with pytest.raises(FlowerfeatError, match=message) as e:
        train.fit(FitConfig(features=path, val_fraction=fraction))
    assert "test_size" not in str(e.value) and "least populated" not in str(e.value)  # no scikit-learn words


def test_small_work_runs_on_one_thread_and_gives_the_callers_threads_back(tmp_path):
    from threadpoolctl import threadpool_info

    from flowerfeat import runtime

    before = torch.get_num_threads()
    torch.set_num_threads(3)  # a notebook's own setting
    try:
        seen = []
        with runtime.threads():
            seen.append(torch.get_num_threads())
            seen += [p["num_threads"] for p in threadpool_info()]
        assert set(seen) == {1} and torch.get_num_threads() == 3
        X, y = blobs(20, dim=8, n_classes=2)
        train.fit_head(write_features(tmp_path / "train.h5", X, y, classes=["a", "b"]), epochs=1)
        assert torch.get_num_threads() == 3  # fitting a head leaves the caller's setting as it was
    finally:
        torch.set_num_threads(before)
