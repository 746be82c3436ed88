"""Localisation and complexity metrics: hand-worked cases, invariants, sklearn/scipy, and Quantus."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy
from sklearn.metrics import roc_auc_score

from clip_xai.metrics.complexity import complexity, complexity_columns, sparseness
from clip_xai.metrics.localisation import (
    METRICS, LocalisationMetrics, bounding_boxes, energy_pointing_game, mask_auroc, pointing_game,
    relevance_mass_accuracy, relevance_rank_accuracy,
)


def square_mask(b: int = 1, h: int = 8, w: int = 8, r0: int = 2, r1: int = 5, c0: int = 3, c1: int = 7) -> torch.Tensor:
    m = torch.zeros(b, h, w, dtype=torch.bool)
    m[:, r0:r1, c0:c1] = True
    return m


def test_inside_scores_perfectly_outside_scores_zero():
    mask = square_mask(2)
    maps = torch.stack([mask[0].float(), (~mask[1]).float()])  # 1 inside / 1 outside the mask
    for name, fn in METRICS.items():
        got = fn(maps, mask)
        assert got.dtype == torch.float64 and got.shape == (2,)
        assert got[0] == 1.0, name
        assert got[1] == 0.0, name


def test_hand_worked_values():
    # 1x4 image, mask on the two right pixels
    mask = torch.tensor([[[False, False, True, True]]])
    a = torch.tensor([[[0.1, 0.6, 0.2, 0.4]]])
    assert pointing_game(a, mask).item() == 0.0  # max 0.6 is outside
    assert relevance_mass_accuracy(a, mask).item() == pytest.approx(0.6 / 1.3)
    assert relevance_rank_accuracy(a, mask).item() == pytest.approx(0.5)  # top-2 = {0.6, 0.4}: one inside
    # AUROC: pairs (in, out): (0.2,0.1) win, (0.2,0.6) loss, (0.4,0.1) win, (0.4,0.6) loss -> 2/4
    assert mask_auroc(a, mask).item() == pytest.approx(0.5)
    # energy pointing game uses the bounding box: an L-shaped mask's box is the full 2x2 block
    m2 = torch.tensor([[[True, False, False], [True, True, False], [False, False, False]]])
    a2 = torch.tensor([[[1.0, 2.0, 4.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])
    assert bounding_boxes(m2)[0].tolist() == [[True, True, False], [True, True, False], [False, False, False]]
    assert energy_pointing_game(a2, m2).item() == pytest.approx(5 / 10)
    assert relevance_mass_accuracy(a2, m2).item() == pytest.approx(3 / 10)


def test_ties():
    mask = torch.tensor([[[True, False, False, False]]])
    # pointing game: a tie for the maximum is a hit when any tied maximum is inside
    assert pointing_game(torch.tensor([[[1.0, 1.0, 0.0, 0.0]]]), mask).item() == 1.0
    assert pointing_game(torch.tensor([[[0.0, 1.0, 1.0, 0.0]]]), mask).item() == 0.0
    # rank accuracy: K=1, the top value is tied between one inside and one outside pixel -> 1/2
    assert relevance_rank_accuracy(torch.tensor([[[1.0, 1.0, 0.0, 0.0]]]), mask).item() == 0.5
    # ... and three-way: 1/3, the expected value over tie-breaking orders
    assert relevance_rank_accuracy(torch.tensor([[[1.0, 1.0, 1.0, 0.0]]]), mask).item() == pytest.approx(1 / 3)
    # AUROC counts ties as 1/2 (sklearn's convention)
    a = torch.tensor([[[0.5, 0.5, 0.2, 0.9]]])
    assert mask_auroc(a, mask).item() == pytest.approx(roc_auc_score([1, 0, 0, 0], [0.5, 0.5, 0.2, 0.9]))
    # a uniform map: mass and rank accuracy = mask area, AUROC = 1/2
    u = torch.ones(1, 8, 8)
    m = square_mask()
    area = m.float().mean().item()
    assert relevance_mass_accuracy(u, m).item() == pytest.approx(area)
    assert relevance_rank_accuracy(u, m).item() == pytest.approx(area)
    assert mask_auroc(u, m).item() == 0.5


def test_rank_accuracy_matches_random_tie_breaking():
    gen = torch.Generator().manual_seed(0)
    a = (torch.rand(1, 6, 6, generator=gen) * 4).floor()  # heavy ties
    m = torch.rand(1, 6, 6, generator=gen) > 0.6
    k = int(m.sum())
    flat_a, flat_m = a.flatten().numpy(), m.flatten().numpy()
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(4000):
        perm = rng.permutation(flat_a.size)
        order = perm[np.argsort(-flat_a[perm], kind="stable")]
        draws.append(flat_m[order[:k]].mean())
    assert relevance_rank_accuracy(a, m).item() == pytest.approx(np.mean(draws), abs=0.01)


def test_auroc_against_sklearn():
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(3, 10, 12, generator=gen).round(decimals=1)  # ties
    m = torch.rand(3, 10, 12, generator=gen) > 0.5
    got = mask_auroc(a, m)
    for i in range(3):
        assert got[i].item() == pytest.approx(roc_auc_score(m[i].flatten().numpy(), a[i].flatten().numpy()), abs=1e-12)


def test_undefined_cases_are_nan_and_flagged():
    mask = square_mask(4)
    mask[1] = False  # empty (attribute absent)
    mask[2] = True  # full
    maps = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(2))
    maps[3] = 0.0  # constant map (min-max of a constant map is all zeros)
    out = LocalisationMetrics()(maps, mask)
    assert out["map_flag"] == ["", "empty_mask", "full_mask", "constant_clean"]
    for name in METRICS:
        assert torch.isfinite(out[name][0]) and torch.isnan(out[name][1:]).all(), name
    assert out["mask_area"].tolist() == pytest.approx([12 / 64, 0.0, 1.0, 12 / 64])
    pert = maps.clone()
    pert[0, 0, 0] = float("nan")
    out = LocalisationMetrics()(pert, mask, "pert")
    assert out["map_flag"][0] == "nan_pert" and torch.isnan(out["pointing_game_pert"][0])


def test_complexity_hand_worked():
    one_hot = torch.zeros(1, 4, 4)
    one_hot[0, 1, 2] = 1.0
    uniform = torch.ones(1, 4, 4)
    assert sparseness(one_hot).item() == pytest.approx(15 / 16)  # (n-1)/n
    assert sparseness(uniform).item() == pytest.approx(0.0)
    assert complexity(one_hot).item() == pytest.approx(0.0)
    assert complexity(uniform).item() == pytest.approx(math.log(16))
    # hand-worked Gini of [0, 1, 2, 3]: sum((2k-n-1) a_k) = -3*0 -1*1 +1*2 +3*3 = 10; / (4 * 6)
    x = torch.tensor([[[3.0, 0.0], [1.0, 2.0]]])
    assert sparseness(x).item() == pytest.approx(10 / 24)
    assert complexity(x).item() == pytest.approx(scipy_entropy([3, 0, 1, 2]))
    assert torch.isnan(sparseness(torch.zeros(1, 3, 3))).item() and torch.isnan(complexity(torch.zeros(1, 3, 3))).item()
    # text maps: only the caption tokens count
    t = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[False, True, True, False, False]])
    assert sparseness(t, valid).item() == pytest.approx(1 / 2)
    assert complexity(t, valid).item() == pytest.approx(0.0)
    cols = complexity_columns(x, "pert")
    assert set(cols) == {"sparseness_pert", "complexity_pert"}


# ------------------------------------------------------------------ Quantus cross-check
def _quantus_inputs(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    b, h, w = 6, 16, 16
    maps = torch.rand(b, h, w, generator=gen) ** 3  # continuous (no ties), non-negative
    masks = torch.zeros(b, h, w, dtype=torch.bool)
    for i in range(b):  # rectangles of varied size and place
        r0, c0 = int(torch.randint(0, 8, (1,), generator=gen)), int(torch.randint(0, 8, (1,), generator=gen))
        masks[i, r0:r0 + 3 + i, c0:c0 + 8 - i] = True
    maps[0][masks[0]] += 2.0  # one sample whose maximum is inside
    x = np.zeros((b, 1, h, w), dtype=np.float32)
    return maps, masks, x, maps[:, None].numpy().astype(np.float64), masks[:, None].numpy().astype(np.float64)


def test_quantus_cross_check():
    quantus = pytest.importorskip("quantus")
    maps, masks, x, a, s = _quantus_inputs()
    y = np.zeros(len(x), dtype=int)
    common = dict(normalise=False, abs=False, disable_warnings=True, display_progressbar=False)

    def q(metric, a_in=a, s_in=s):
        return np.asarray(metric(model=None, x_batch=x, y_batch=y, a_batch=a_in.copy(), s_batch=s_in, channel_first=True),
                          dtype=np.float64)

    np.testing.assert_allclose(pointing_game(maps, masks).numpy(), q(quantus.PointingGame(**common)), atol=1e-6)
    np.testing.assert_allclose(relevance_mass_accuracy(maps, masks).numpy(),
                               q(quantus.RelevanceMassAccuracy(**common)), atol=1e-6)
    np.testing.assert_allclose(relevance_rank_accuracy(maps, masks).numpy(),
                               q(quantus.RelevanceRankAccuracy(**common)), atol=1e-6)
    np.testing.assert_allclose(mask_auroc(maps, masks).numpy(), q(quantus.AUC(**common)), atol=1e-6)
    # attribution localisation (Kohlbrenner et al.) on the bounding box = our energy pointing game
    box = bounding_boxes(masks)[:, None].numpy().astype(np.float64)
    np.testing.assert_allclose(energy_pointing_game(maps, masks).numpy(),
                               q(quantus.AttributionLocalisation(**common, max_size=1.0), s_in=box), atol=1e-6)
    np.testing.assert_allclose(relevance_mass_accuracy(maps, masks).numpy(),
                               q(quantus.AttributionLocalisation(**common, max_size=1.0)), atol=1e-6)
    cx = dict(normalise=False, abs=True, disable_warnings=True, display_progressbar=False)
    np.testing.assert_allclose(sparseness(maps).numpy(), q(quantus.Sparseness(**cx)), atol=1e-6)
    np.testing.assert_allclose(complexity(maps).numpy(), q(quantus.Complexity(**cx)), atol=1e-6)
