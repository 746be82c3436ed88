"""The benchmark script's table, projection, honest FLOP rows and quick mode (no speed is asserted)."""
from __future__ import annotations

import itertools

import pandas as pd
import pytest
import torch

from clip_xai.perf import bench
from clip_xai.errors import ClipXaiError
from clip_xai.perf.peaks import count_flops


@pytest.fixture
def one_thread():
    """One intra-op thread for the table test's bench run, as the GPU check's dry run runs: no speed
    is asserted, and its batch-1 rows with two OpenMP threads waiting for each other on a busy 2-core
    machine took 636 s (load ~5) against 84 s with one thread side by side. The other bench tests
    were faster with two threads, so they keep the default."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_bench_table_projection_and_overrides(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(bench, "THESIS_METHODS", ["gradcam", "rise"])
    df = bench.run_bench("tiny", "cpu", [1, 2], ["gradcam", "rise"], repeats=1, out=tmp_path,
                         extra=["explainer.n_masks=8", "explainer.chunk=4"], flops=False, agreement=0)
    assert list(df.columns) == ["device", "model", "precision", "explainer", "cache", "batch", "images_per_s"]
    perturbations = ["fgsm (perturbation)", "pgd (perturbation)", "map_attack (perturbation, gradcam)"]
    assert df.explainer.tolist() == [p for p in perturbations for _ in (1, 2)] + ["gradcam"] * 2 + ["rise"] * 2
    assert df.batch.tolist() == [1, 2] * 5 and (df.images_per_s > 0).all() and (df.cache == "-").all()
    assert (df.precision == "fp32").all() and df.model.str.contains("random weights").all()
    assert pd.read_csv(tmp_path / "bench.csv").shape == df.shape
    md = (tmp_path / "bench.md").read_text()
    assert "Projected thesis sweep" in md and "% of it " in md


def test_explainer_overrides_apply_only_where_the_key_exists():
    overrides = ["model=tiny"]
    rise = bench._explainer_cfg(overrides, "rise", ["explainer.chunk=7"])
    gradcam = bench._explainer_cfg(overrides, "gradcam", ["explainer.chunk=7"])
    assert rise.explainer.chunk == 7 and "chunk" not in gradcam.explainer


def test_quick_mode_divides_the_cost_knobs_and_says_by_how_much():
    over, scale, label = bench.quick_overrides(bench._explainer_cfg(["model=tiny"], "rise", []))
    assert over == ["explainer.n_masks=50"] and scale == pytest.approx(50 / 2000) and label == "n_masks=50 of 2000"
    over, scale, _ = bench.quick_overrides(bench._explainer_cfg(["model=tiny"], "m2ib", []))
    assert over == ["explainer.steps=2"] and scale == pytest.approx(0.2)
    assert bench.quick_overrides(bench._explainer_cfg(["model=tiny"], "gradcam", [])) == ([], 1.0, "")
    pgd = bench.compose(["model=tiny", "perturbation=pgd"])
    assert bench.quick_overrides(pgd, "perturbation")[0] == ["perturbation.steps=2"]


def test_measure_halves_the_batch_on_out_of_memory(tiny):
    seen = []

    def factory(px, tok, seeds):
        def fn():
            seen.append(px.shape[0])
            if px.shape[0] > 2:
                raise torch.OutOfMemoryError("simulated")
        return fn

    rate, used, peak = bench.measure(tiny, factory, 8, torch.device("cpu"), repeats=1)
    assert used == 2 and rate > 0 and peak is None and seen[:2] == [8, 4]


def test_cuda_only_precision_is_refused_on_cpu(tmp_path):
    with pytest.raises(ClipXaiError, match="needs a CUDA device"):
        bench.run_bench("tiny", "cpu", [1], ["gradcam"], repeats=1, out=tmp_path, precision="tf32")
    with pytest.raises(ClipXaiError, match="FP8"):
        bench.run_bench("tiny", "cpu", [1], ["gradcam"], repeats=1, out=tmp_path, precision="fp8")


def test_a_row_above_the_peak_is_an_error():
    ok = pd.DataFrame({"explainer": ["a", "b"], "cache": ["-", "warm"], "batch": [1, 16], "peak_share_pct": [3.0, 99.9]})
    bench.check_peak_shares(ok)
    bad = ok.assign(peak_share_pct=[3.0, 3970.0])
    with pytest.raises(ClipXaiError, match=r"b batch 16 \(warm\): 3970%"):
        bench.check_peak_shares(bad)


def test_caption_cache_gets_cold_and_warm_rows_with_the_flops_of_their_calls(tmp_path, monkeypatch):
    """surgery caches caption-template embeddings: the cold row (unique captions) carries exactly the
    FLOPs of encoding one caption's templates more per image than the warm row; no row tops the peak."""
    monkeypatch.setattr(bench, "_caption_ids", itertools.count(1000))  # suffixes 1000, 1001, ...: one token each
    df = bench.run_bench("tiny", "cpu", [2], ["surgery", "gradcam"], repeats=1, out=tmp_path, agreement=0,
                         perturbations=())
    rows = {(r.explainer, r.cache): r for r in df.itertuples()}
    assert set(rows) == {("fgsm (perturbation)", "-"), ("surgery", "cold"), ("surgery", "warm"), ("gradcam", "-")}
    assert (df.peak_share_pct <= 100).all()
    from clip_xai.config import build

    model = build(bench.compose(["model=tiny"]), "model")
    surgery = build(bench._explainer_cfg(["model=tiny"], "surgery", []), "explainer")
    _, tok, _ = bench._inputs(model, 2, torch.device("cpu"))
    per_caption = [count_flops(lambda c=c: surgery.ensemble_embeddings(model, [f"{c} 1234"])) for c in tok.texts]
    extra = (rows[("surgery", "cold")].gflop_per_image - rows[("surgery", "warm")].gflop_per_image) * 1e9
    assert extra == pytest.approx(sum(per_caption) / 2, rel=1e-6)
