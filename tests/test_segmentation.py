"""Segmentation scores (Chefer et al. 2021): hand-worked images, the threshold setting, AP against
scikit-learn, counts against an independent numpy computation, pooling, and the schema entries.

The agreement with the reference's own functions (``batch_pix_accuracy``,
``batch_intersection_union``, ``get_ap_scores``) was measured in a scratch harness: docs/parity.md.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clip_xai import schema
from clip_xai.errors import ClipXaiError
from clip_xai.metrics.localisation import (HIGHER_IS_BETTER, LocalisationMetrics, pooled_segmentation,
                                           segmentation_scores)
from clip_xai.metrics.localisation.segmentation import average_precision

# 2x2 image A: min-max map [[0, .25], [.75, 1]] (values exact in binary), mean .5 -> bottom row is
# foreground; the object is the right column.
MAP_A = torch.tensor([[[0.0, 1.0], [3.0, 4.0]]])
MASK_A = torch.tensor([[[False, True], [False, True]]])
# image B: a constant map (no information: background everywhere, both soft scores 0); 1 object pixel
MAP_B = torch.full((1, 2, 2), 7.0)
MASK_B = torch.tensor([[[True, False], [False, False]]])


def test_hand_worked_image():
    s = segmentation_scores(MAP_A, MASK_A)
    # pixels (0,0) bg/bg ok, (0,1) bg/fg, (1,0) fg/bg, (1,1) fg/fg ok
    assert s["seg_correct"].item() == 2 and s["seg_labeled"].item() == 4
    assert (s["seg_inter_fg"].item(), s["seg_union_fg"].item(), s["seg_inter_bg"].item(), s["seg_union_bg"].item()) == (1, 3, 1, 3)
    assert s["pixel_accuracy"].item() == pytest.approx(0.5, abs=1e-12)
    assert s["miou"].item() == pytest.approx(1 / 3, abs=1e-12)
    # soft pair ranked together: {1: 2 positives}, {.75: 2 negatives}, {.25: 2 positives}, {0: 2 negatives}
    # AP = 2/4 * 2/2 + 2/4 * 4/6
    assert s["mean_ap"].item() == pytest.approx(0.5 + 1 / 3, abs=1e-12)


def test_constant_map_predicts_background_and_pools():
    s = segmentation_scores(MAP_B, MASK_B)
    assert (s["seg_correct"].item(), s["seg_inter_bg"].item(), s["seg_union_bg"].item(), s["seg_inter_fg"].item(),
            s["seg_union_fg"].item()) == (3, 3, 4, 0, 1)
    assert s["miou"].item() == pytest.approx(0.375, abs=1e-12)
    assert s["mean_ap"].item() == pytest.approx(0.5, abs=1e-12)  # all 8 scores tied: precision 4/8
    nan_map = segmentation_scores(torch.full((1, 2, 2), float("nan")), MASK_B)
    assert all(torch.equal(nan_map[k], s[k]) for k in s)  # the reference zeroes NaN the same way
    both = segmentation_scores(torch.cat([MAP_A, MAP_B]), torch.cat([MASK_A, MASK_B]))
    rows = {k: v.numpy() for k, v in both.items()}
    pooled = pooled_segmentation(rows)
    assert pooled["pixel_accuracy"] == pytest.approx(5 / 8, abs=1e-12)
    assert pooled["miou"] == pytest.approx((4 / 7 + 1 / 4) / 2, abs=1e-12)  # sums over images, then classes
    assert pooled["mean_ap"] == pytest.approx((5 / 6 + 0.5) / 2, abs=1e-12)
    assert pooled["miou"] != pytest.approx(rows["miou"].mean())  # not the mean of the per-image values
    rows_nan = {k: np.append(v, np.nan) for k, v in rows.items()}  # a sample without a mask is left out
    assert pooled_segmentation(rows_nan) == pytest.approx(pooled)
    assert np.isnan(pooled_segmentation({k: v[2:] for k, v in rows_nan.items()})["miou"])
    assert np.isnan(pooled_segmentation({})["miou"])


def test_threshold_setting():
    fixed = segmentation_scores(MAP_A, MASK_A, threshold=0.2)  # foreground: .25, .75, 1
    assert (fixed["seg_inter_fg"].item(), fixed["seg_union_fg"].item(), fixed["seg_correct"].item()) == (2, 3, 3)
    assert segmentation_scores(MAP_A, MASK_A, threshold=0.2)["mean_ap"] == segmentation_scores(MAP_A, MASK_A)["mean_ap"]
    for bad in ("median", 1.5, -0.1, None):
        with pytest.raises(ClipXaiError, match="seg_threshold"):
            LocalisationMetrics(seg_threshold=bad)
    assert LocalisationMetrics(seg_threshold="0.3").seg_threshold == 0.3


def test_average_precision_against_sklearn():
    sklearn = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 6, (4, 300), generator=g).float() / 5  # many ties
    targets = torch.rand(4, 300, generator=g) > 0.6
    got = average_precision(scores, targets).numpy()
    want = [sklearn.average_precision_score(t.numpy(), s.numpy()) for s, t in zip(scores, targets)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert average_precision(scores[:1], torch.zeros(1, 300, dtype=torch.bool)).item() == 0.0


def test_counts_against_numpy_and_invariance():
    rng = np.random.default_rng(0)
    maps = rng.integers(0, 9, (3, 16, 16)).astype(np.float32) / 8
    masks = rng.random((3, 16, 16)) > 0.5
    s = segmentation_scores(torch.tensor(maps), torch.tensor(masks))
    for i in range(3):
        x = (maps[i] - maps[i].min()) / (maps[i].max() - maps[i].min())
        pred = x > x.mean()
        m = masks[i]
        assert s["seg_correct"][i] == (pred == m).sum() and s["seg_labeled"][i] == m.size
        assert s["seg_inter_fg"][i] == (pred & m).sum() and s["seg_union_fg"][i] == (pred | m).sum()
        assert s["seg_inter_bg"][i] == (~pred & ~m).sum() and s["seg_union_bg"][i] == (~pred | ~m).sum()
    # min-max inside the metric: a positive affine change of the map changes nothing (exact in binary)
    t = segmentation_scores(torch.tensor(maps * 4 + 2), torch.tensor(masks))
    assert all(torch.equal(s[k], t[k]) for k in s)


def test_localisation_metrics_columns():
    maps = torch.cat([MAP_A, MAP_B]) / 4
    out = LocalisationMetrics()(maps, torch.cat([MASK_A, MASK_B]), "pert")
    assert out["map_flag"] == ["", "constant_pert"]
    for name in (*schema.SEGMENTATION_METRICS, *schema.SEGMENTATION_COUNTS):
        assert f"{name}_pert" in out and torch.isfinite(out[f"{name}_pert"]).all()  # flagged maps count too
    assert torch.isnan(out["pointing_game_pert"][1])  # the other metrics stay undefined there
    assert out["miou_pert"][0].item() == pytest.approx(1 / 3, abs=1e-12)


def test_schema_entries():
    for name in schema.SEGMENTATION_METRICS:
        assert schema.HIGHER_IS_BETTER[name] is True and HIGHER_IS_BETTER[name] is True
        assert name in schema.LOCALISATION_METRICS and f"{name}_pert" in schema.LOCALISATION_COLUMNS
    for name in schema.SEGMENTATION_COUNTS:
        assert name in schema.LOCALISATION_COLUMNS and f"{name}_pert" in schema.LOCALISATION_COLUMNS
        assert np.isnan(schema.OPTIONAL_COLUMNS[name])  # older localisation results still load
