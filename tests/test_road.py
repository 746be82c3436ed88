"""ROAD: the batched Noisy Linear Imputation vs an independent scipy solve, masks, and the score."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spl
import torch
import torch.nn.functional as F
from torch import nn

from clip_xai.metrics.faithfulness import road as road_mod
from clip_xai.metrics.faithfulness.road import impute, road_keep_masks, road_scores

SOLVERS = ["cg", "direct"]


# ------------------------------------------------------------------- independent reference


def _weight(dy: int, dx: int) -> float:
    return 1 / 6 if dy == 0 or dx == 0 else 1 / 12


def reference_impute(img: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """(C,H,W) image, (H,W) bool keep → imputed image; plain loops + scipy spsolve (METHODS §3.4)."""
    c, h, w = img.shape
    removed = [(y, x) for y in range(h) for x in range(w) if not keep[y, x]]
    index = {p: k for k, p in enumerate(removed)}
    a = sp.lil_matrix((len(removed), len(removed)))
    b = np.zeros((len(removed), c))
    for k, (y, x) in enumerate(removed):
        total = 0.0
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = y + dy, x + dx
                if (dy, dx) == (0, 0) or not (0 <= yy < h and 0 <= xx < w):
                    continue
                wt = _weight(dy, dx)
                total += wt
                if keep[yy, xx]:
                    b[k] += wt * img[:, yy, xx]
                else:
                    a[k, index[(yy, xx)]] -= wt
        a[k, k] = total
    sol = spl.spsolve(a.tocsc(), b).reshape(len(removed), c)
    out = img.copy()
    for k, (y, x) in enumerate(removed):
        out[:, y, x] = sol[k]
    return out


def neighbour_mean(img: np.ndarray, y: int, x: int) -> np.ndarray:
    h, w = img.shape[-2:]
    num, den = 0.0, 0.0
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            yy, xx = y + dy, x + dx
            if (dy, dx) != (0, 0) and 0 <= yy < h and 0 <= xx < w:
                num = num + _weight(dy, dx) * img[:, yy, xx]
                den += _weight(dy, dx)
    return num / den


# ------------------------------------------------------------------------------ imputation


@pytest.mark.parametrize("solver", SOLVERS)
def test_imputer_matches_scipy_spsolve(solver):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(4, 3, 12, 12, generator=g, dtype=torch.float64)
    fracs = torch.tensor([0.2, 0.5, 0.8, 0.95])
    keep = torch.rand(4, 12, 12, generator=g) > fracs.view(4, 1, 1)
    keep[3] = False
    keep[3, 0, 0] = True  # one kept pixel: the whole rest is imputed from it
    out = impute(imgs, keep, noise=0.0, solver=solver)
    for i in range(4):
        ref = reference_impute(imgs[i].numpy(), keep[i].numpy())
        np.testing.assert_allclose(out[i].numpy(), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_imputed_pixels_are_neighbour_means_and_kept_pixels_fixed(solver):
    g = torch.Generator().manual_seed(1)
    imgs = torch.rand(2, 3, 20, 16, generator=g)
    keep = torch.rand(2, 20, 16, generator=g) > 0.6
    out = impute(imgs, keep, noise=0.0, solver=solver)
    assert out.dtype == imgs.dtype and out.shape == imgs.shape
    assert torch.equal(out[keep[:, None].expand_as(out)], imgs[keep[:, None].expand_as(imgs)])
    o = out.double().numpy()
    worst = max(np.abs(o[i][:, y, x] - neighbour_mean(o[i], y, x)).max()
                for i in range(2) for y, x in zip(*np.nonzero(~keep[i].numpy())))
    assert worst < 1e-5  # float32 output; the float64 solve meets 1e-6


def test_cg_and_direct_agree_on_a_large_hole():
    g = torch.Generator().manual_seed(2)
    img = torch.rand(1, 3, 64, 64, generator=g, dtype=torch.float64)
    keep = torch.ones(1, 64, 64, dtype=torch.bool)
    keep[0, 8:60, 4:50] = False  # a hole spanning most of the image (slow modes for CG)
    a = impute(img, keep, noise=0.0, solver="cg", tol=1e-8)
    b = impute(img, keep, noise=0.0, solver="direct")
    assert (a - b).abs().max() < 1e-5


def test_nothing_kept_fills_with_zero_and_nothing_removed_is_identity():
    img = torch.rand(2, 3, 10, 10)
    keep = torch.zeros(2, 10, 10, dtype=torch.bool)
    keep[1] = True
    for solver in SOLVERS:
        out = impute(img, keep, noise=0.0, solver=solver)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert torch.equal(out[1], img[1])


def test_noise_only_on_removed_pixels_and_seeded():
    g = torch.Generator().manual_seed(3)
    img = torch.rand(1, 3, 32, 32, generator=g)
    keep = torch.rand(1, 32, 32, generator=g) > 0.5
    draws = torch.randn(1, 3, 32, 32, generator=g)
    clean = impute(img, keep, noise=0.0, solver="direct")
    noisy = impute(img, keep, noise=0.01, noise_draws=draws, solver="direct")
    diff = noisy - clean
    k = keep[:, None].expand_as(diff)
    assert torch.equal(diff[k], torch.zeros_like(diff[k]))
    torch.testing.assert_close(diff[~k], 0.01 * draws[~k], atol=1e-6, rtol=0)


def test_bad_arguments():
    with pytest.raises(ValueError):
        impute(torch.rand(1, 3, 8, 8), torch.ones(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        impute(torch.rand(1, 3, 8, 8), torch.ones(1, 8, 8, dtype=torch.bool), solver="lu")


# ----------------------------------------------------------------------------------- masks


def test_keep_masks_follow_numpy_percentiles():
    g = torch.Generator().manual_seed(4)
    coarse = torch.rand(3, 1, 4, 4, generator=g)
    maps = F.interpolate(coarse, size=(24, 24), mode="bilinear", align_corners=False)[:, 0]  # many near-ties
    maps[2] = (maps[2] * 4).round() / 4  # exact ties
    pcts = [10, 25, 50, 90]
    morf, lerf = road_keep_masks(maps, pcts)
    assert morf.shape == lerf.shape == (3, 4, 24, 24)
    for i in range(3):
        m = maps[i].numpy()
        for j, p in enumerate(pcts):
            np.testing.assert_array_equal(morf[i, j].numpy(), m < np.percentile(m, p))
            np.testing.assert_array_equal(lerf[i, j].numpy(), (1 - m) < np.percentile(1 - m, p))
    # MoRF p removes the top (100-p)% of pixels (strict threshold: ties removed together).
    assert abs(morf[0, 0].float().mean().item() - 0.10) < 0.02


# ------------------------------------------------------------------------------- the score


class PixelSetModel(nn.Module):
    """Image embedding depends only on the pixels where ``region`` is True (a known set)."""

    def __init__(self, region: torch.Tensor, dim: int = 16):
        super().__init__()
        self.region = region
        g = torch.Generator().manual_seed(5)
        n = int(region.sum()) * 3
        self.proj = torch.randn(n, dim, generator=g, dtype=torch.float64)
        self.vision = nn.Module()
        self.vision.register_buffer("mean", torch.tensor([0.48, 0.46, 0.41]).view(1, 3, 1, 1))
        self.vision.register_buffer("std", torch.tensor([0.27, 0.26, 0.28]).view(1, 3, 1, 1))

    def encode_image(self, pixels):
        z = (pixels - self.vision.mean) / self.vision.std
        feats = z[:, :, self.region].flatten(1).double()
        return F.normalize(feats @ self.proj + 0.1, dim=-1).float()


def _region_case(seed: int = 6):
    h = w = 16
    region = torch.zeros(h, w, dtype=torch.bool)
    region[:, : w // 2] = True  # the model only sees the left half
    model = PixelSetModel(region)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(2, 3, h, w, generator=g)
    # A random map that is higher everywhere on the seen half: left in [0.5, 1], right in [0, 0.5).
    noise = torch.rand(2, h, w, generator=g)
    maps = torch.where(region, 0.5 + 0.5 * noise, 0.499 * noise)
    with torch.no_grad():
        text = model.encode_image(pixels)  # target = the clean image embedding → s_orig = 1
    s_orig = (model.encode_image(pixels) * text).sum(-1)
    return model, pixels, maps, text, s_orig


@pytest.mark.parametrize("solver", SOLVERS)
def test_road_of_map_and_negation_have_opposite_signs(solver):
    model, pixels, maps, text, s_orig = _region_case()
    pos = road_scores(model, pixels, maps, text, s_orig, noise=0.0, solver=solver)
    neg = road_scores(model, pixels, 1 - maps, text, s_orig, noise=0.0, solver=solver)
    assert (pos["road"] > 0.01).all() and (neg["road"] < -0.01).all()
    # MoRF of the negation = LeRF of the map (identical masks), so road flips exactly.
    torch.testing.assert_close(neg["road"], -pos["road"], atol=1e-6, rtol=0)
    # LeRF at p >= 50 removes only unseen pixels: no change; MoRF at p >= 50 only seen ones: a drop.
    hi = [i for i, p in enumerate(road_mod.DEFAULT_PERCENTAGES) if p >= 50]
    assert pos["lerf_curve"][:, hi].abs().max() < 1e-6
    assert (pos["morf_curve"][:, hi] < -1e-3).all()
    assert torch.allclose(pos["road"], (pos["road_lerf"] - pos["road_morf"]) / 2)


def test_road_noise_is_seeded_per_sample():
    model, pixels, maps, text, s_orig = _region_case()
    a = road_scores(model, pixels, maps, text, s_orig, noise=0.01, seeds=[11, 12], percentages=[30, 70])
    b = road_scores(model, pixels[1:], maps[1:], text[1:], s_orig[1:], noise=0.01, seeds=[12], percentages=[30, 70],
                    chunk=1)
    c = road_scores(model, pixels, maps, text, s_orig, noise=0.01, seeds=[11, 13], percentages=[30, 70])
    assert torch.equal(a["road"][1:], b["road"])  # independent of batch mates and chunking
    assert a["road"][1] != c["road"][1]
