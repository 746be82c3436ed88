"""Sensitivity metrics vs independent references (scipy, scikit-image, plain Python sets)."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import rankdata, spearmanr
from skimage.metrics import structural_similarity

from clip_xai import schema
from clip_xai.metrics.sensitivity import (
    HIGHER_IS_BETTER,
    SensitivityMetrics,
    average_ranks,
    decode_flags,
    map_flag_codes,
    map_flags,
    relative_similarity_change,
    spearman,
    ssim,
    topk_intersection,
)

# The package re-exports the functions `spearman` and `ssim` under their module names, so the
# metric modules themselves are fetched by full name.
spearman_mod = importlib.import_module("clip_xai.metrics.sensitivity.spearman")
ssim_mod = importlib.import_module("clip_xai.metrics.sensitivity.ssim")
topk_mod = importlib.import_module("clip_xai.metrics.sensitivity.topk")
sim_mod = importlib.import_module("clip_xai.metrics.sensitivity.similarity_change")

TOL = 1e-5


# ----------------------------------------------------------------------------- map generators

def _minmax(m: torch.Tensor) -> torch.Tensor:
    lo = m.amin(dim=(1, 2), keepdim=True)
    hi = m.amax(dim=(1, 2), keepdim=True)
    return (m - lo) / (hi - lo)


def _upsampled(gen: torch.Generator, n: int, grid: int, size: int, mode: str) -> torch.Tensor:
    """Min-max normalised (n, size, size) float64 maps upsampled from a grid×grid patch map."""
    lo = torch.rand(n, 1, grid, grid, generator=gen, dtype=torch.float64) ** 2
    kw = {} if mode == "nearest" else {"align_corners": False}
    return _minmax(F.interpolate(lo, size=(size, size), mode=mode, **kw)[:, 0])


def _blobs(gen: torch.Generator, n: int, size: int) -> torch.Tensor:
    """Sums of 3 Gaussian blobs with random centres/widths, min-max normalised."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64),
                            torch.arange(size, dtype=torch.float64), indexing="ij")
    c = torch.rand(n, 3, 2, generator=gen, dtype=torch.float64) * size
    s = (0.05 + 0.2 * torch.rand(n, 3, 1, 1, generator=gen, dtype=torch.float64)) * size
    d2 = (yy - c[..., 0, None, None]) ** 2 + (xx - c[..., 1, None, None]) ** 2
    return _minmax(torch.exp(-d2 / (2 * s**2)).sum(dim=1))


def _pairs() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Named (clean, perturbed) float64 batches covering random, tied and structured maps."""
    g = torch.Generator().manual_seed(1234)
    rand32 = torch.rand(6, 32, 32, generator=g, dtype=torch.float64)
    near7 = _upsampled(g, 4, 7, 224, "nearest")
    near14 = _upsampled(g, 4, 14, 224, "nearest")
    bil14 = _upsampled(g, 4, 14, 224, "bilinear")
    bil7_32 = _upsampled(g, 4, 7, 32, "bilinear")
    blobs = _blobs(g, 4, 224)
    noisy = (bil14 + 0.05 * torch.randn(bil14.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return {
        "random_32": (rand32, torch.rand(6, 32, 32, generator=g, dtype=torch.float64)),
        "random_224": (torch.rand(2, 224, 224, generator=g, dtype=torch.float64),
                       torch.rand(2, 224, 224, generator=g, dtype=torch.float64)),
        "nearest7_vs_nearest7": (near7, _upsampled(g, 4, 7, 224, "nearest")),
        "nearest14_vs_noisy_bilinear": (near14, noisy),
        "bilinear14_vs_noisy": (bil14, noisy),
        "bilinear7_32_vs_nearest": (bil7_32, _upsampled(g, 4, 7, 32, "nearest")),
        "blobs_vs_blobs": (blobs, _blobs(g, 4, 224)),
        "monotone_transform": (bil14, bil14**3),
        "monotone_nearest": (near14, torch.sqrt(near14)),
        "negated": (blobs, 1.0 - blobs),
        "identical": (near7, near7.clone()),
    }


PAIRS = _pairs()


def _ref_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([spearmanr(a[i].ravel(), b[i].ravel()).statistic for i in range(len(a))])


def _ref_ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([
        structural_similarity(a[i], b[i], data_range=b[i].max() - b[i].min()) for i in range(len(a))
    ])


# ----------------------------------------------------------------------------- Spearman

def test_average_ranks_matches_rankdata_with_ties():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (3, 40), generator=g).to(torch.float32)  # heavy ties
    x[1] = 7.0  # a constant row
    got = average_ranks(x).numpy()
    want = np.stack([rankdata(row, method="average") for row in x.numpy()])
    np.testing.assert_array_equal(got, want)
    assert average_ranks(x).dtype == torch.float64


@pytest.mark.parametrize("name", list(PAIRS))
def test_spearman_matches_scipy(name):
    a, b = PAIRS[name]
    got = spearman(a, b).numpy()  # whole batch at once vs per-map reference
    want = _ref_spearman(a.numpy(), b.numpy())
    assert got.shape == (a.shape[0],)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_spearman_float32_input_and_known_values():
    a, _ = PAIRS["bilinear14_vs_noisy"]
    a32 = a.float()
    np.testing.assert_allclose(spearman(a32, a32 ** 3).numpy(), 1.0, atol=1e-12)
    np.testing.assert_allclose(spearman(a32, -a32).numpy(), -1.0, atol=1e-12)
    b = PAIRS["bilinear14_vs_noisy"][1].float()
    np.testing.assert_allclose(spearman(a32, b).numpy(),
                               _ref_spearman(a32.numpy(), b.numpy()), atol=TOL)


def test_spearman_constant_and_nan_give_nan():
    a = torch.rand(3, 32, 32, dtype=torch.float64)
    b = a.clone()
    b[0] = 0.5
    b[1, 3, 4] = float("nan")
    got = spearman(a, b)
    assert math.isnan(got[0]) and math.isnan(got[1])
    assert got[2] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- SSIM

@pytest.mark.parametrize("name", list(PAIRS))
def test_ssim_matches_skimage(name):
    a, b = PAIRS[name]
    want64 = _ref_ssim(a.numpy(), b.numpy())
    # float64 option: agrees to rounding.
    np.testing.assert_allclose(ssim(a, b, dtype=torch.float64).numpy(), want64, rtol=0, atol=1e-9)
    # float32 default on float64 maps, vs the float64 reference.
    np.testing.assert_allclose(ssim(a, b).numpy(), want64, rtol=0, atol=TOL)
    # float32 maps vs scikit-image computing in float32 itself.
    a32, b32 = a.float(), b.float()
    np.testing.assert_allclose(ssim(a32, b32).numpy(), _ref_ssim(a32.numpy(), b32.numpy()),
                               rtol=0, atol=TOL)


def test_ssim_chunking_shapes_and_data_range_argument():
    a, b = PAIRS["nearest14_vs_noisy_bilinear"]
    full = ssim(a, b, chunk=64)
    # float32 reductions may be laid out differently for other chunk sizes: rounding-level only
    np.testing.assert_allclose(ssim(a, b, chunk=3).numpy(), full.numpy(), atol=1e-7)
    np.testing.assert_allclose(ssim(a[:, None], b[:, None]).numpy(), full.numpy(), atol=1e-7)
    assert full.dtype == torch.float64 and full.shape == (a.shape[0],)
    # explicit scalar and per-sample data ranges
    want = [structural_similarity(a[i].numpy(), b[i].numpy(), data_range=1.0) for i in range(len(a))]
    np.testing.assert_allclose(ssim(a, b, data_range=1.0).numpy(), want, atol=TOL)
    rng = torch.linspace(0.5, 2.0, a.shape[0], dtype=torch.float64)
    want = [structural_similarity(a[i].numpy(), b[i].numpy(), data_range=float(rng[i]))
            for i in range(len(a))]
    np.testing.assert_allclose(ssim(a, b, data_range=rng).numpy(), want, atol=TOL)


def test_ssim_data_range_from_second_map():
    # The thesis takes data_range from the perturbed (second) map: swapping the arguments changes it.
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, 32, 32, generator=g, dtype=torch.float64)
    b = 0.3 * torch.rand(2, 32, 32, generator=g, dtype=torch.float64)
    want = _ref_ssim(a.numpy(), b.numpy())
    np.testing.assert_allclose(ssim(a, b).numpy(), want, atol=TOL)
    assert not np.allclose(ssim(b, a).numpy(), want, atol=1e-3)


def test_ssim_degenerate_inputs():
    a = torch.rand(3, 16, 16, dtype=torch.float64)
    b = a.clone()
    b[0] = 0.25  # data range 0
    b[1, 0, 0] = float("inf")
    got = ssim(a, b)
    assert math.isnan(got[0]) and math.isnan(got[1])
    assert got[2] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        ssim(torch.rand(1, 5, 5), torch.rand(1, 5, 5))  # smaller than the 7x7 window
    with pytest.raises(ValueError):
        ssim(torch.rand(2, 16, 16), torch.rand(2, 16, 17))


# ----------------------------------------------------------------------------- Top-K

def test_topk_hand_worked():
    a = torch.tensor([[5.0, 4, 3, 2, 1, 0]]).reshape(1, 2, 3)
    b = torch.tensor([[0.0, 1, 2, 3, 4, 5]]).reshape(1, 2, 3)
    assert topk_intersection(a, b, k=3).tolist() == [0.0]  # {0,1,2} vs {3,4,5}
    assert topk_intersection(a, b, k=4).tolist() == [0.5]  # {0,1,2,3} ∩ {2,3,4,5} = {2,3}
    assert topk_intersection(a, b, k=6).tolist() == [1.0]
    assert topk_intersection(a, a, k=2).tolist() == [1.0]
    with pytest.raises(ValueError):
        topk_intersection(a, b, k=7)


def test_topk_matches_python_sets():
    g = torch.Generator().manual_seed(5)
    a = torch.rand(5, 32, 32, generator=g, dtype=torch.float64)  # continuous: no ties
    b = (a + 0.3 * torch.rand(5, 32, 32, generator=g, dtype=torch.float64))
    for k in (1, 10, 100):
        got = topk_intersection(a, b, k=k).tolist()
        for i in range(5):
            sa = set(np.argsort(-a[i].numpy().ravel(), kind="stable")[:k].tolist())
            sb = set(np.argsort(-b[i].numpy().ravel(), kind="stable")[:k].tolist())
            assert got[i] == pytest.approx(len(sa & sb) / k)
    # batch vs per-map, on tied 224x224 maps with the default k
    x, y = PAIRS["nearest14_vs_noisy_bilinear"]
    batch = topk_intersection(x, y)
    for i in range(x.shape[0]):
        ia = set(torch.topk(x[i].flatten(), 100).indices.tolist())
        ib = set(torch.topk(y[i].flatten(), 100).indices.tolist())
        assert batch[i].item() == pytest.approx(len(ia & ib) / 100)


# ----------------------------------------------------------------------------- similarity change

def test_relative_similarity_change_hand_worked():
    s_orig = torch.tensor([0.5, 0.25, 0.2, 0.0])
    s_pert = torch.tensor([0.25, 0.3, 0.2, 0.1])
    got = relative_similarity_change(s_orig, s_pert)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got[:3].numpy(), [-0.5, 0.2, 0.0], atol=1e-7)
    assert math.isinf(got[3])


# ----------------------------------------------------------------------------- flags and suite

def test_map_flags():
    clean = torch.rand(5, 8, 8)
    pert = torch.rand(5, 8, 8)
    clean[1] = 0.0
    pert[2, 1, 1] = float("nan")
    clean[3] = 1.0
    pert[3] = 1.0
    clean[4, 0, 0] = float("-inf")
    assert map_flags(clean, pert) == [
        "", "constant_clean", "nan_pert", "constant_clean+constant_pert", "nan_clean",
    ]
    assert decode_flags(map_flag_codes(clean, pert)) == map_flags(clean, pert)


def test_suite_outputs_and_degenerate_maps():
    a, b = PAIRS["nearest14_vs_noisy_bilinear"]
    clean, pert = a.float().clone(), b.float().clone()
    clean[0] = 0.0  # constant (e.g. a min-max normalised all-zero map)
    pert[1, 5, 5] = float("nan")
    s_orig = torch.tensor([0.30, 0.28, 0.25, 0.31])
    s_pert = torch.tensor([0.27, 0.28, 0.20, 0.31])
    out = SensitivityMetrics(k=100, ssim_chunk=2)(clean, pert, s_orig, s_pert)
    assert set(out) == {"spearman", "ssim", "topk", "sim_diff", "map_flag"}
    assert out["map_flag"] == ["constant_clean", "nan_pert", "", ""]
    for key in ("spearman", "ssim", "topk", "sim_diff"):
        assert out[key].shape == (4,) and out[key].device == clean.device
    for key in ("spearman", "ssim", "topk"):
        assert torch.isnan(out[key][:2]).all(), key
        assert torch.isfinite(out[key][2:]).all(), key
    np.testing.assert_allclose(out["spearman"][2:].numpy(),
                               _ref_spearman(clean[2:].numpy(), pert[2:].numpy()), atol=TOL)
    np.testing.assert_allclose(out["ssim"][2:].numpy(),
                               _ref_ssim(clean[2:].numpy(), pert[2:].numpy()), atol=TOL)
    np.testing.assert_allclose(out["topk"][2:].numpy(),
                               topk_intersection(clean[2:], pert[2:]).numpy())
    np.testing.assert_allclose(out["sim_diff"].numpy(), ((s_pert - s_orig) / s_orig).numpy(),
                               atol=1e-7)


def test_score_directions_match_schema():
    assert spearman_mod.HIGHER_IS_BETTER is True
    assert ssim_mod.HIGHER_IS_BETTER is True
    assert topk_mod.HIGHER_IS_BETTER is True
    assert sim_mod.HIGHER_IS_BETTER is False
    for key, value in HIGHER_IS_BETTER.items():
        assert schema.HIGHER_IS_BETTER[key] is value
        assert key in schema.SENSITIVITY_COLUMNS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    a, b = PAIRS["nearest14_vs_noisy_bilinear"]
    s = torch.rand(a.shape[0]) + 0.1
    cpu = SensitivityMetrics()(a.float(), b.float(), s, s * 0.9)
    gpu = SensitivityMetrics()(a.float().cuda(), b.float().cuda(), s.cuda(), (s * 0.9).cuda())
    for key in ("spearman", "ssim", "sim_diff"):
        assert gpu[key].device.type == "cuda"
        np.testing.assert_allclose(gpu[key].cpu().numpy(), cpu[key].numpy(), atol=TOL)
    # topk on tied maps may legitimately differ between devices (tie order); bounds only.
    assert ((gpu["topk"] >= 0) & (gpu["topk"] <= 1)).all()
    np.testing.assert_allclose(spearman(a.cuda(), b.cuda()).cpu().numpy(),
                               _ref_spearman(a.numpy(), b.numpy()), atol=TOL)
    np.testing.assert_allclose(ssim(a.cuda(), b.cuda()).cpu().numpy(),
                               _ref_ssim(a.numpy(), b.numpy()), atol=TOL)
