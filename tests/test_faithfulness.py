"""Faithfulness: Confidence Drop/Increase (image, text), the metrics suite, the study, the CLI run."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clip_xai import schema
from clip_xai.explainers.postprocess import image_maps, text_maps
from clip_xai.metrics.faithfulness import (
    HIGHER_IS_BETTER,
    FaithfulnessMetrics,
    content_only_tokens,
    drop_increase,
    image_confidence,
    masked_image_pixels,
    masked_text_tokens,
    resolve_text_rule,
    text_confidence,
    text_keep_mask,
)
from tests.helpers import REPO, run_cli

# ------------------------------------------------------------------------------ image protocol


class LeftHalfModel(nn.Module):
    """A fake adapter whose image embedding depends only on the left half of the image."""

    def __init__(self, size: int = 16, dim: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(3 * size * (size // 2), dim, generator=g)
        self.vision = nn.Module()
        self.vision.register_buffer("mean", torch.tensor([0.48, 0.46, 0.41]).view(1, 3, 1, 1))
        self.vision.register_buffer("std", torch.tensor([0.27, 0.26, 0.28]).view(1, 3, 1, 1))

    def encode_image(self, pixels):
        z = (pixels - self.vision.mean) / self.vision.std
        return F.normalize(z[..., : z.shape[-1] // 2].flatten(1) @ self.proj + 0.05, dim=-1)


def test_masked_pixels_normalise_to_normalised_pixels_times_map():
    mean, std = torch.tensor([0.48, 0.46, 0.41]).view(1, 3, 1, 1), torch.tensor([0.27, 0.26, 0.28]).view(1, 3, 1, 1)
    x = torch.rand(2, 3, 8, 8)
    m = torch.rand(2, 8, 8)
    xm = masked_image_pixels(x, m, mean)
    torch.testing.assert_close((xm - mean) / std, (x - mean) / std * m[:, None])  # full 2-D multiply
    assert torch.equal(masked_image_pixels(x, torch.ones(2, 8, 8), mean), x)
    assert torch.equal(masked_image_pixels(x, torch.zeros(2, 8, 8), mean), mean.expand_as(x))


def test_all_ones_map_gives_no_change(tiny, batch_for):
    pixels, tokens, _ = batch_for(tiny, 2)
    with torch.no_grad():
        t = tiny.encode_text(tokens)
        s_orig = (tiny.encode_image(pixels) * t).sum(-1)
    s = image_confidence(tiny, pixels, torch.ones(2, *pixels.shape[-2:]), t)
    drop, incr = drop_increase(s - s_orig)
    assert torch.equal(s, s_orig)
    assert drop.tolist() == [0.0, 0.0] and incr.tolist() == [0.0, 0.0]


def test_map_keeping_only_what_the_model_sees():
    model = LeftHalfModel()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 16, 16, generator=g)
    with torch.no_grad():
        target = model.encode_image(x)  # s_orig = 1
    s_orig = (model.encode_image(x) * target).sum(-1)
    right_zero = torch.ones(3, 16, 16)
    right_zero[..., 8:] = 0
    left_zero = 1 - right_zero
    s_keep = image_confidence(model, x, right_zero, target)
    s_lose = image_confidence(model, x, left_zero, target)
    drop, incr = drop_increase(s_keep - s_orig)
    assert torch.equal(s_keep, s_orig) and drop.tolist() == [0.0] * 3 and incr.tolist() == [0.0] * 3
    drop, incr = drop_increase(s_lose - s_orig)
    assert (drop > 20).all() and incr.tolist() == [0.0] * 3


def test_drop_and_increase_definitions():
    drop, incr = drop_increase(torch.tensor([-0.25, 0.0, 0.1]))
    assert drop.tolist() == [25.0, 0.0, 0.0]
    assert incr.tolist() == [0.0, 0.0, 100.0]
    assert drop.dtype == torch.float64


# ------------------------------------------------------------------------------- text protocol


def _scores(tokens, per_row: list[list[float]]) -> torch.Tensor:
    """Token scores placed on each row's content positions (zeros elsewhere)."""
    s = torch.zeros(tokens.ids.shape, dtype=torch.float32)
    for b, vals in enumerate(per_row):
        pos = tokens.content_mask[b].nonzero().squeeze(1)
        s[b, pos] = torch.tensor(vals, dtype=torch.float32)
    return s


def test_text_keep_mask_median_like_numpy(tiny):
    tokens = tiny.tokenize(["a photo of a cat", "a dog on a mat"])
    vals = [[0.1, 0.9, 0.3, 0.5, 0.7], [0.1, 0.4, 0.6, 0.9, 0.2]]
    keep = text_keep_mask(_scores(tokens, vals), tokens.content_mask, 50)
    for b, v in enumerate(vals):
        pos = tokens.content_mask[b].nonzero().squeeze(1)
        expect = np.array(v) > np.percentile(v, 50)
        assert keep[b, pos].tolist() == expect.tolist()
        assert keep[b].sum() == expect.sum()  # nothing outside the caption tokens is kept


def test_text_protocol_mask_id_by_hand(tiny):
    """M2IB on CLIP: SOT/EOT removed, dropped tokens → id 0, pooling at argmax of the ids."""
    tokens = tiny.tokenize(["a photo of a cat", "a dog"])
    # "a photo of a cat" = [320, 1125, 539, 320, 2368]; "a dog" = [320, 1929]
    scores = _scores(tokens, [[0.1, 0.9, 0.3, 0.5, 0.7], [0.2, 0.8]])
    assert resolve_text_rule("auto", tiny) == "mask_id"
    keep = text_keep_mask(scores, tokens.content_mask, 50)  # medians 0.5 and 0.5
    base, masked = masked_text_tokens(tiny, tokens, keep, "mask_id")
    assert masked.ids.tolist() == [[0, 1125, 0, 0, 2368], [0, 1929, 0, 0, 0]]
    assert base.ids.tolist() == [[320, 1125, 539, 320, 2368], [320, 1929, 0, 0, 0]]
    assert masked.pool_index.tolist() == [4, 1] and base.pool_index.tolist() == [4, 1]  # argmax (gotcha 2)
    # the score is cos(f_T(those ids), f_I(unmasked image))
    pixels = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        img = tiny.encode_image(pixels)
        want = (tiny.encode_text(tiny.tokens_from_ids(masked.ids)) * img).sum(-1)
    s_base, s_mask = text_confidence(tiny, tokens, scores, img, 50, "auto")
    torch.testing.assert_close(s_mask, want)


def test_text_protocol_pad_attention_by_hand(tiny):
    tokens = tiny.tokenize(["a photo of a cat"])
    scores = _scores(tokens, [[0.1, 0.9, 0.3, 0.5, 0.7]])
    keep = text_keep_mask(scores, tokens.content_mask, 50)
    base, masked = masked_text_tokens(tiny, tokens, keep, "pad_attention")
    assert base is tokens
    assert masked.ids[0, :8].tolist() == [49406, 0, 1125, 0, 0, 2368, 49407, 0]
    assert masked.attention_mask[0, :8].tolist() == [1, 0, 1, 0, 0, 1, 1, 0]
    assert masked.pool_index.tolist() == [6]  # EOT kept


def test_text_protocol_on_altclip_uses_pad_and_attention(altclip_tiny):
    tokens = altclip_tiny.tokenize(["a cat", "a red dog"])
    assert resolve_text_rule("auto", altclip_tiny) == "pad_attention"
    n = tokens.content_mask.sum(1).tolist()
    scores = _scores(tokens, [list(np.linspace(0, 1, k)) for k in n])
    keep = text_keep_mask(scores, tokens.content_mask, 50)
    _, masked = masked_text_tokens(altclip_tiny, tokens, keep, "pad_attention")
    dropped = tokens.content_mask & ~keep
    assert dropped.any()
    assert (masked.ids[dropped] == altclip_tiny.pad_id).all()
    assert (masked.attention_mask[dropped] == 0).all()
    assert torch.equal(masked.ids[~dropped], tokens.ids[~dropped])
    assert masked.pool_index.tolist() == [0, 0]  # <s> kept and pooled
    with torch.no_grad():
        img = altclip_tiny.encode_image(torch.rand(2, 3, 224, 224))
    s_base, s_mask = text_confidence(altclip_tiny, tokens, scores, img)
    assert torch.isfinite(s_base).all() and torch.isfinite(s_mask).all()


def test_content_only_without_keep_is_the_caption_tokens(tiny):
    tokens = tiny.tokenize(["a photo of a cat"])
    assert content_only_tokens(tiny, tokens).ids.tolist() == [[320, 1125, 539, 320, 2368]]


# ---------------------------------------------------------------------------------- the suite


def test_suite_columns_flags_and_missing_modality(tiny, batch_for):
    from clip_xai.explainers.gradcam import GradCAM
    from clip_xai.explainers.selfattn import SelfAttention

    pixels, tokens, seeds = batch_for(tiny, 2)
    img = image_maps(GradCAM()(tiny, pixels, tokens, seeds), tuple(pixels.shape[-2:]))
    txt = text_maps(SelfAttention(modality="text")(tiny, pixels, tokens, seeds), tokens.content_mask)
    img[1] = 0.3  # constant image map → flagged, image metrics NaN
    metrics = FaithfulnessMetrics(road_percentages=[50])
    assert metrics.suite == "faithfulness"
    out = metrics(tiny, pixels, tokens, img, txt, seeds=seeds)
    assert out["map_flag"] == ["", "constant_image"]
    for k in ("conf_drop_image", "conf_incr_image", "road", "road_morf", "road_lerf"):
        assert torch.isfinite(out[k][0]) and torch.isnan(out[k][1]), k
    for k in ("conf_drop_text", "conf_incr_text", "sim_orig"):
        assert torch.isfinite(out[k]).all(), k
    assert set(HIGHER_IS_BETTER) <= set(schema.HIGHER_IS_BETTER)
    assert all(HIGHER_IS_BETTER[k] == schema.HIGHER_IS_BETTER[k] for k in HIGHER_IS_BETTER)
    only_text = FaithfulnessMetrics(road=False)(tiny, pixels, tokens, None, txt)
    assert torch.isnan(only_text["conf_drop_image"]).all() and torch.isnan(only_text["road"]).all()
    assert torch.isfinite(only_text["conf_drop_text"]).all()


def test_suite_rejects_bad_settings():
    for kw in ({"percentile": 120}, {"text_rule": "zero"}, {"road_percentages": [0, 50]}, {"road_solver": "lu"}):
        with pytest.raises(ValueError):
            FaithfulnessMetrics(**kw)


# ---------------------------------------------------------------------------------- the study


def test_study_runs_both_modalities_in_process(tiny, tmp_path):
    from clip_xai.data import SampleDataset
    from clip_xai.explainers.selfattn import SelfAttention
    from clip_xai.studies.base import RunContext
    from clip_xai.studies.faithfulness import FaithfulnessStudy, with_modality

    explainer = SelfAttention(modality="image")
    text = with_modality(explainer, "text")
    assert text is not explainer and text.modality == "text" and explainer.modality == "image"
    assert text.heads == explainer.heads and with_modality(explainer, "image") is explainer

    study = FaithfulnessStudy()
    ids = {"dataset": "sample", "model": "tiny", "explainer": "selfattn", "modality": "image", "seed": 0}
    ctx = RunContext(run_dir=tmp_path, device=torch.device("cpu"), model=tiny, dataset=SampleDataset(limit=2),
                     explainer=explainer, metrics=FaithfulnessMetrics(road_percentages=[50]), ids=ids,
                     batch_size=2, save_examples=2)
    summary = study.run(ctx)
    df = pd.read_parquet(tmp_path / schema.RESULTS_FILE)
    assert list(df.columns) == schema.FAITHFULNESS_COLUMNS + schema.RUN_COLUMNS and len(df) == 2
    assert (df["modality"] == "image+text").all() and (df["study"] == "faithfulness").all()
    metric_cols = ["conf_drop_image", "conf_incr_image", "conf_drop_text", "conf_incr_text", "road"]
    assert df[metric_cols].notna().all().all()
    assert summary["faithfulness"]["text_rule"] == "mask_id"
    ex = np.load(tmp_path / schema.EXAMPLES_FILE)
    assert ex["image"].shape == (2, 224, 224, 3) and ex["map_clean"].shape == (2, 224, 224)


def test_study_needs_faithfulness_metrics(tiny, tmp_path):
    from clip_xai.data import SampleDataset
    from clip_xai.errors import ClipXaiError
    from clip_xai.explainers.gradcam import GradCAM
    from clip_xai.metrics.sensitivity import SensitivityMetrics
    from clip_xai.studies.base import RunContext
    from clip_xai.studies.faithfulness import FaithfulnessStudy

    ctx = RunContext(run_dir=tmp_path, device=torch.device("cpu"), model=tiny, dataset=SampleDataset(limit=1),
                     explainer=GradCAM(), metrics=SensitivityMetrics(), ids={"explainer": "gradcam"})
    with pytest.raises(ClipXaiError, match="metrics=faithfulness"):
        FaithfulnessStudy().run(ctx)


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    res = run_cli(["model=tiny", "dataset=sample", "explainer=gradcam", "study=faithfulness", "metrics=faithfulness",
                   "logger=none", "dataset.limit=3", "device=cpu", "metrics.road_percentages=[30,70]",
                   f"output_root={tmp_path}"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list(tmp_path.rglob(schema.DONE_FILE))
    assert len(runs) == 1
    run = runs[0].parent
    df = pd.read_parquet(run / schema.RESULTS_FILE)
    assert list(df.columns) == schema.FAITHFULNESS_COLUMNS + schema.RUN_COLUMNS and len(df) == 3
    assert df["conf_drop_image"].notna().all() and df["road"].notna().all()
    assert df["conf_drop_text"].isna().all() and df["conf_incr_text"].isna().all()  # gradcam: image only
    summary = json.loads((run / schema.SUMMARY_FILE).read_text())
    assert summary["study"] == "faithfulness" and "road" in summary["means"]


@pytest.mark.parametrize("experiment,model", [("abm_table1", "vit_b32"), ("abm_altclip", "altclip")])
def test_experiments_compose(experiment, model):
    from hydra import compose, initialize_config_dir

    from clip_xai.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}", "dataset=imagenet", "data_root=/d"],
                      return_hydra_config=True)
    assert (cfg.model.name, cfg.study.name, cfg.metrics.name) == (model, "faithfulness", "faithfulness")
    assert cfg.dataset.limit == 2000 and cfg.dataset.subset_seed == cfg.seed
    assert cfg.dataset.root == "/d/imagenet"
    params = cfg.hydra.sweeper.params
    assert params.dataset.split(",") == ["cc", "imagenet", "flickr8k"]
    # The ABM paper's code: NIB's CLIP adaptations of RISE, Saliency, MFABA and FastIG.
    assert params.explainer.split(",") == ["m2ib", "rise_nib", "eclip", "gradcam", "chefer", "saliency_nib",
                                           "mfaba_nib", "fastig_nib", "abm"]
    for name in ("saliency_nib", "mfaba_nib", "fastig_nib", "rise_nib"):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            ex = compose("config", overrides=[f"experiment={experiment}", f"explainer={name}", "data_root=/d"]).explainer
        assert ex.name == name
        assert ex.variant == "attention" if name != "rise_nib" else (ex.n_masks, ex.p1) == (6000, 0.1)
