"""metrics=manipulation: the masking check recomputed by hand on the tiny model."""
from __future__ import annotations

import pytest
import torch

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import text_target
from clip_xai.metrics.manipulation import ManipulationMetrics, random_patches
from tests.helpers import compose_cfg


@pytest.fixture(scope="module")
def case(tiny, sample_images):
    pixels, captions = sample_images
    pixels, tokens = pixels[:2], tiny.tokenize(list(captions[:2]))
    text = text_target(tiny, tokens)
    with torch.no_grad():
        s = (tiny.encode_image(pixels) * text).sum(-1)
    # hand-built maps on the 14x14 grid of 16-px patches: sample 0 lights the top-left 7x7 block
    # (49 patches = round(0.25 * 196)), sample 1 the bottom-right one
    maps = torch.zeros(2, 224, 224)
    maps[0, :112, :112] = 1.0
    maps[1, 112:, 112:] = 1.0
    return pixels, text, s, maps


def by_hand(tiny, pixels, text, s, region_px):
    """s(x) − s(x with ``region_px`` (B,H,W) set to the mean colour), written out independently."""
    masked = pixels.clone()
    for c in range(3):
        masked[:, c][region_px] = tiny.vision.mean.flatten()[c]
    with torch.no_grad():
        return (s - (tiny.encode_image(masked) * text).sum(-1)).double()


def test_masking_check_matches_a_hand_computation(tiny, case):
    pixels, text, s, maps = case
    seeds = torch.tensor([5, 6])
    metric = ManipulationMetrics(top_share=0.25, threshold=0.0)
    pert_pixels = (pixels + 0.01).clamp(0, 1)
    with torch.no_grad():
        s_pert = (tiny.encode_image(pert_pixels) * text).sum(-1)
    out = metric.model_columns(tiny, pixels, pert_pixels, text, seeds, maps, maps.flip(0), s, s_pert)
    top = maps > 0.5
    want = by_hand(tiny, pixels, text, s, top)
    assert torch.allclose(out["mask_drop"], want, atol=1e-5)
    assert torch.allclose(out["mask_drop_pert"], by_hand(tiny, pert_pixels, text, s_pert, top.flip(0)), atol=1e-5)
    rand = random_patches(seeds, 196, 49, "cpu").view(2, 1, 14, 14).float()
    rand_px = torch.nn.functional.interpolate(rand, size=(224, 224), mode="nearest")[:, 0] > 0.5
    assert torch.allclose(out["mask_drop_rand"], by_hand(tiny, pixels, text, s, rand_px), atol=1e-5)
    flags = (out["mask_drop"] - out["mask_drop_rand"] < 0).double()
    assert torch.equal(out["mask_flag"], flags)
    # the threshold decides: +inf flags every map, -inf none
    hi = ManipulationMetrics(threshold=float("inf")).model_columns(
        tiny, pixels, pert_pixels, text, seeds, maps, maps, s, s_pert)
    lo = ManipulationMetrics(threshold=float("-inf")).model_columns(
        tiny, pixels, pert_pixels, text, seeds, maps, maps, s, s_pert)
    assert (hi["mask_flag"] == 1).all() and (lo["mask_flag_pert"] == 0).all()


def test_random_patches_are_seeded_and_exact(tiny):
    a = random_patches(torch.tensor([1, 2, 3]), 196, 49, "cpu")
    assert torch.equal(a, random_patches(torch.tensor([1, 2, 3]), 196, 49, "cpu"))
    assert (a.sum(1) == 49).all() and not torch.equal(a[0], a[1])
    assert torch.equal(random_patches(torch.tensor([2]), 196, 49, "cpu")[0], a[1])  # whatever the batch


def test_a_nan_map_gives_nan_columns_not_a_flag(tiny, case):
    pixels, text, s, maps = case
    bad = maps.clone()
    bad[1, 0, 0] = float("nan")
    out = ManipulationMetrics().model_columns(tiny, pixels, pixels, text, torch.tensor([1, 2]), maps, bad, s, s)
    assert out["mask_flag_pert"][0] in (0.0, 1.0) and torch.isnan(out["mask_flag_pert"][1])
    assert torch.isnan(out["mask_drop_pert"][1]) and not torch.isnan(out["mask_drop"]).any()


def test_bad_share_is_one_clear_error():
    from clip_xai.config import build

    with pytest.raises(ClipXaiError, match="top_share"):
        build(compose_cfg(["metrics=manipulation", "metrics.top_share=1.5"]), "metrics")
    assert build(compose_cfg(["metrics=manipulation"]), "metrics").suite == "sensitivity"
