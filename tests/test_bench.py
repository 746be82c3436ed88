"""The benchmark script's table and projection (behaviour only: no speed is asserted)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from clip_xai import bench
from clip_xai.errors import ClipXaiError


def test_bench_table_projection_and_overrides(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "THESIS_METHODS", ["gradcam", "rise"])
    df = bench.run_bench("tiny", "cpu", [1, 2], ["gradcam", "rise"], repeats=1, out=tmp_path,
                         extra=["explainer.n_masks=8", "explainer.chunk=4"], flops=False, agreement=0)
    assert list(df.columns) == ["device", "model", "precision", "explainer", "batch", "images_per_s"]
    perturbations = ["fgsm (perturbation)", "pgd (perturbation)", "map_attack (perturbation, gradcam)"]
    assert df.explainer.tolist() == [p for p in perturbations for _ in (1, 2)] + ["gradcam"] * 2 + ["rise"] * 2
    assert df.batch.tolist() == [1, 2] * 5 and (df.images_per_s > 0).all()
    assert (df.precision == "fp32").all() and df.model.str.contains("random weights").all()
    assert pd.read_csv(tmp_path / "bench.csv").shape == df.shape
    md = (tmp_path / "bench.md").read_text()
    assert "Projected thesis sweep" in md and "% of it " in md


def test_explainer_overrides_apply_only_where_the_key_exists():
    overrides = ["model=tiny"]
    rise = bench._explainer_cfg(overrides, "rise", ["explainer.chunk=7"])
    gradcam = bench._explainer_cfg(overrides, "gradcam", ["explainer.chunk=7"])
    assert rise.explainer.chunk == 7 and "chunk" not in gradcam.explainer


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
