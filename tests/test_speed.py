"""Distance to the limit (FLOP counts, peak table, projections), reference precision, baselines.

Behaviour only: no speed is asserted.
"""
from __future__ import annotations

import io
import logging

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from clip_xai.perf import bench, peaks, projection
from clip_xai.config import precision_scope, resolve_precision
from clip_xai.models.base import attend

from .helpers import compose_cfg


def test_flop_counts_match_hand_counts():
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, generator=gen, requires_grad=True)
    fwd = 2 * 3 * 8 * 4
    assert peaks.count_flops(lambda: lin(x)) == fwd
    # backward: grad of the input and of the weight, one product of the same size each
    assert peaks.count_flops(lambda: lin(x).sum().backward()) == 3 * fwd
    assert peaks.count_flops(lambda: torch.autograd.grad(lin(x).sum(), [x])) == 2 * fwd  # works with autograd.grad
    b, h, n, d = 2, 3, 5, 4
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    attention = 2 * (2 * b * h * n * n * d)  # q·kᵀ and probs·v
    # the CPU's fused kernel (no formula in PyTorch) and the explicit path of recorded blocks agree
    assert peaks.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == attention
    assert peaks.count_flops(lambda: attend(q, k, v, None)) == attention
    conv = torch.nn.Conv2d(3, 8, 4, stride=4)
    assert peaks.count_flops(lambda: conv(torch.randn(1, 3, 16, 16))) == 2 * 16 * (3 * 4 * 4) * 8


def test_peak_table_lookup():
    assert peaks.gpu_peak("NVIDIA H100 80GB HBM3", "bf16") == ("H100 SXM", 989.4)
    assert peaks.gpu_peak("NVIDIA H100 80GB HBM3", "fp32") == ("H100 SXM", 67.0)
    assert peaks.gpu_peak("NVIDIA H100 PCIe", "tf32") == ("H100 PCIe", 378.0)
    assert peaks.gpu_peak("NVIDIA H100 NVL", "fp16") == ("H100 NVL", 835.5)
    assert peaks.gpu_peak("NVIDIA H200", "bf16") == ("H200 SXM", 989.4)
    assert peaks.gpu_peak("NVIDIA A100-SXM4-80GB", "tf32") == ("A100", 156.0)
    assert peaks.gpu_peak("NVIDIA A10", "bf16") == ("A10", 125.0)
    assert peaks.gpu_peak("NVIDIA A10G", "bf16") == (None, None)  # not A10, not A100: unknown
    assert peaks.gpu_peak("Tesla V100-SXM2-16GB", "bf16") == ("V100 SXM2", None)  # no bf16 on V100
    assert peaks.gpu_peak("Some Future GPU", "fp32") == (None, None)
    source, peak = peaks.device_peak(torch.device("cpu"), "fp32")
    assert "measured" in source and peak > 0


def test_projection_names_the_largest_share_and_the_time_at_peak():
    best = pd.Series({"fgsm (perturbation)": 100.0, "a": 50.0, "b": 1.0})
    flops = pd.Series({"fgsm (perturbation)": 1e9, "a": 1e9, "b": 1e12})
    text = bench.projection(best, flops, 10.0, ["a", "b"])
    per_a = 5285 * (5 / 50 + 4 / 100)
    per_b = 5285 * (5 / 1 + 4 / 100)
    assert f"{(per_a + per_b) / 3600:.2f} h" in text and f"{100 * per_b / (per_a + per_b):.0f}% of it b" in text
    total = 5285 * (5 * 1e9 + 5 * 1e12 + 2 * 4 * 1e9)
    assert f"{total / 10e12 / 3600:.2f} h at the device's peak" in text
    assert "peak" not in bench.projection(best, None, None, ["a", "b"])


def test_bench_rows_flops_peak_share_and_precision_agreement(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "THESIS_METHODS", ["gradcam"])
    df = bench.run_bench("tiny", "cpu", [2], ["gradcam"], repeats=1, out=tmp_path, agreement=2)
    assert {"gflop_per_image", "tflops_per_s", "peak_share_pct"} <= set(df.columns)
    # the FGSM step is one forward and one backward to the pixels; Grad-CAM stops at a block: cheaper
    fgsm, gradcam = df.set_index("explainer").gflop_per_image[["fgsm (perturbation)", "gradcam"]]
    assert fgsm > gradcam > 0
    row = df.iloc[-1]
    assert row.tflops_per_s == pytest.approx(row.gflop_per_image * row.images_per_s / 1e3)
    assert row.peak_share_pct > 0
    agree = pd.read_csv(tmp_path / "agreement.csv")
    assert agree.explainer.tolist() == ["gradcam"] and agree.precision.tolist() == ["bf16"]
    assert -1 <= agree.mean_spearman[0] <= 1
    md = (tmp_path / "bench.md").read_text()
    assert "Peak:" in md and "measured fp32 matmul" in md and "at the device's peak" in md and "bf16" in md


def test_reference_precision_is_fp16_on_cuda_and_fp32_with_a_note_on_cpu(caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision(cuda, "reference") == "fp16"
    with caplog.at_level(logging.WARNING, logger="clip_xai"):
        assert resolve_precision(cpu, "reference", announce=True) == "fp32"
    assert "fp16 on CUDA" in caplog.text and "strict fp32" in caplog.text
    with precision_scope(cpu, "reference"):
        assert not torch.is_autocast_enabled("cpu")
    assert compose_cfg(["experiment=thesis_sensitivity"]).precision == "reference"
    assert compose_cfg([]).precision == "fp32"  # strict fp32 stays the global default


def test_long_run_prints_projection_and_alternatives(tiny):
    cpu = torch.device("cpu")
    out = io.StringIO()
    sec = projection.announce_if_long("rise", {"n_masks": 2000}, tiny, cpu, "fp32", 100, "sensitivity", out)
    # 100 samples x (2 maps at the measured 0.110 img/s + 1 FGSM step at 70 img/s)
    assert sec == pytest.approx(100 * (2 / 0.110 + 1 / 70.0))
    text = out.getvalue()
    assert "projected to take about" in text and "explainer.n_masks=500" in text and "dataset.limit=10" in text
    quiet = io.StringIO()
    short = projection.announce_if_long("rise", {"n_masks": 20}, tiny, cpu, "fp32", 2, "sensitivity", quiet)
    assert short == pytest.approx(2 * (2 / 0.110 / 100 + 1 / 70.0)) and quiet.getvalue() == ""
    assert projection.announce_if_long("unknown", {}, tiny, cpu, "fp32", 2, "sensitivity", quiet) is None


def test_plain_rise_baseline_gives_our_map_for_the_same_masks(tiny, batch_for):
    """The bench's plain 50-mask loop (native open_clip forward, NumPy/skimage masks) and clip_xai's
    RISE agree when fed the same masks: the speed rows compare the same computation."""
    from clip_xai.perf.baselines import plain_rise, plain_rise_masks
    from clip_xai.explainers.rise import RISE

    pixels, tokens, _ = batch_for(tiny, 1)
    plain = plain_rise(tiny, pixels, tiny.encode_text(tokens), 20, seed=0)
    masks = torch.from_numpy(plain_rise_masks(20, 8, 0.5, 224, np.random.default_rng(0)))

    class SameMasks:
        n, p1, size = 20, 0.5, (224, 224)

        @staticmethod
        def chunk(start, stop):
            return masks[start:stop]

    ours = RISE(n_masks=20)
    ours.image_masks = lambda size, device: SameMasks
    torch.testing.assert_close(ours(tiny, pixels, tokens)[0], plain, rtol=0, atol=1e-6)


def test_baselines_section_times_metrics_against_scipy_and_skimage(monkeypatch):
    from clip_xai.perf import baselines

    monkeypatch.setattr(baselines, "time_rise", lambda device, n, repeats: {  # ViT-B/16 is too slow for a test
        "masks": n, "chunk": 16, "ours_s": 2.0, "plain_s": 3.0})
    metrics = baselines.time_metrics(torch.device("cpu"), pairs=2, repeats=1)
    assert metrics["max_diff"] < 1e-6 and metrics["ours_ms"] > 0 and metrics["plain_ms"] > 0
    text = baselines.run_baselines(torch.device("cpu"), repeats=1, n_masks=8, pairs=2)
    assert "8 masks" in text and "| 1.50 |" in text and "scipy + scikit-image" in text
