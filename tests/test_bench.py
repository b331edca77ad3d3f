"""A smoke test that the benchmark runs end to end and reports consistent figures (timings are not asserted)."""

from __future__ import annotations

import pytest


from flowerfeat import runtime, bench
from flowerfeat.config import ExtractConfig
from conftest import make_folder, vgg_trunk


@pytest.mark.onnxruntime
def test_bench_runs_and_reports_ratios(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype, device, n=2048, seconds=1.5: 100.0)  # keep it short
    data = make_folder(tmp_path / "flowers", {"train": 3, "test": 1})
    lines = []
    # a small torchvision model: its whole network serves the textbook's loop as VGG16's does, in a fraction of the time
    cfg = ExtractConfig(data=data, model="mobilenet_v3_small", weights="none", batch_size=4, workers=0,
                        precision="fp32")  # fmt: skip
    exports, export = [], runtime.export_onnx
    monkeypatch.setattr(runtime, "export_onnx", lambda *a: exports.append(1) or export(*a))
    res = bench.run_bench(cfg, limit=10, agreement_images=2, log=lines.append)
    assert len(exports) == 1  # flowerfeat's run exports; the onnxruntime row loads that file
    f = res.figures
    assert f["train_images"] + f["test_images"] == 10
    assert f["naive_over_flowerfeat_extract"] == f["naive_s"] / f["extract_s"] > 0
    assert 0 < f["loop_s"] < f["extract_s"] and f["naive_over_flowerfeat_loop"] == f["naive_s"] / f["loop_s"]
    assert f["textbook_over_flowerfeat"] == f["textbook_s"] / f["flowerfeat_s"] > 0
    assert 0.99 < f["bf16_cosine"] <= 1.0 + 1e-6
    bf16 = {"torch-bf16"} if runtime.cpu_has_bf16() else set()  # timed where the CPU has native bf16
    assert set(f["engines"]) == {"torch", "onnxruntime"} | bf16 and f["engines"]["onnxruntime"]["min_cosine"] > 0.9999
    assert any(s.startswith("engine onnxruntime (fp32): ") and "x torch" in s for s in lines)
    for row in f["engines"].values():  # the pipeline beside the same trunk alone, and their ratio
        assert row["trunk_alone_ips"] > 0 and row["pipeline_over_trunk"] == row["images_per_s"] / row["trunk_alone_ips"]
    assert any(s.startswith("(a) textbook loop") for s in lines) and any("Test Accuracy (Overall)" in s for s in lines)


def test_flop_count_matches_vgg16():
    trunk = vgg_trunk("fc7")
    assert abs(bench.gflop_per_image(trunk) - 30.9) < 0.2  # VGG16 to fc7: 15.5 G multiply-adds


def test_summary_sets_the_loops_apart_and_says_what_was_not_timed():
    fig = {"naive_s": 8.0, "extract_s": 12.0, "loop_s": 2.0, "textbook_s": float("nan"), "flowerfeat_s": 13.0,
           "gflop_per_image": 0.8, "peak_kind": "fp32", "fit_s": 0.1, "flowerfeat_peak_rss_mib": 100.0}  # fmt: skip
    lines = bench._summary(fig, 20.0, 400.0, 320, log=lambda s: None)
    assert lines[0].startswith("extraction speed-up over the naive loop (b)/(c): 0.67x, the loops alone 4.00x")
    assert lines[1] == "end-to-end speed-up over the textbook (a)/(c): not timed"
