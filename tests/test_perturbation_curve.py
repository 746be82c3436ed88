"""Positive/negative perturbation curves: known answers on a hand-made classifier, the reference's
pixel counts, map order and ties, the study's input checks, and one entrypoint run on the tiny model."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from clip_xai.errors import ClipXaiError
from clip_xai.metrics.faithfulness.perturbation_curve import (curve_auc, perturbation_curves, point_scores,
                                                              reference_maps, remove_pixels, removal_counts,
                                                              removal_fractions, removal_order)
from clip_xai.schema import CONDITION_KEYS, CURVE_HIGHER_IS_BETTER, PERTURBATION_CURVE_COLUMNS
from clip_xai.studies.perturbation_curve import PerturbationCurveStudy

S = 32  # side of the synthetic images
REGION = (slice(8, 16), slice(8, 24))  # 128 of 1024 pixels hold the class evidence


def region_classifier(pixels: torch.Tensor) -> torch.Tensor:
    """Logits of a 2-class model whose class-0 score is 10 × the mean brightness inside REGION only;
    class 1 is a constant 5: a bright region is class 0, a dark one class 1."""
    inside = pixels[:, :, REGION[0], REGION[1]].mean((1, 2, 3))
    return torch.stack([10.0 * inside, torch.full_like(inside, 5.0)], 1)


@pytest.fixture(scope="module")
def synthetic():
    """Two bright images (class 0), a map that covers REGION (plus a tie-free ramp) and its negation."""
    pixels = torch.ones(2, 3, S, S)
    ramp = torch.linspace(0, 0.01, S * S).view(S, S)
    on_region = ramp.clone()
    on_region[REGION] += 1.0
    maps = torch.stack([on_region, on_region])
    return pixels, maps, torch.zeros(2, dtype=torch.long)


def curves_of(synthetic, maps, direction):
    pixels, _, label = synthetic
    counts = removal_counts("per", S * S)
    return perturbation_curves(region_classifier, pixels, maps, label, counts, direction)


def test_a_map_on_the_evidence_is_steeper_positive_and_flatter_negative_than_its_negation(synthetic):
    _, maps, _ = synthetic
    anti = 1.0 - maps  # the negation, min-maxed
    pos, pos_anti = curves_of(synthetic, maps, "positive"), curves_of(synthetic, anti, "positive")
    neg, neg_anti = curves_of(synthetic, maps, "negative"), curves_of(synthetic, anti, "negative")
    # hand-worked: removing the region first (128 px < 10% = 102 px... at step 1 102 of its 128 pixels are
    # gone: 10·26/128 = 2.03 < 5 → miss) makes every positive step a miss; the negation removes the
    # region only after the other 896 pixels, i.e. never within 90% (921 px: 25 region pixels, 10·103/128 > 5)
    assert pos.values["hit"][0].tolist() == [1.0] + [0.0] * 9
    assert pos_anti.values["hit"][0].tolist() == [1.0] * 10
    assert neg.values["hit"][0].tolist() == [1.0] * 10
    assert neg_anti.values["hit"][0].tolist() == [1.0] + [0.0] * 9
    for name in ("hit", "prob_diff", "logit_diff", "log_odds"):
        assert bool((pos.auc(name) < pos_anti.auc(name)).all()), name
        assert bool((neg.auc(name) > neg_anti.auc(name)).all()), name
    # logit of the top class after step 1 of the positive curve: class 1's constant 5 vs the clean 10
    assert pos.values["logit_diff"][0, 1].item() == pytest.approx(5.0 - 10.0)


def test_point_zero_is_the_clean_image(synthetic):
    pixels, maps, label = synthetic
    res = curves_of(synthetic, maps, "positive")
    clean = region_classifier(pixels)
    expect = point_scores(clean, label, clean)
    for name, v in expect.items():
        assert torch.equal(res.values[name][:, 0], v.double()), name
    assert res.values["prob_diff"][:, 0].eq(0).all() and res.values["logit_diff"][:, 0].eq(0).all()
    assert res.fraction[0] == 0.0


def test_point_scores_follow_the_reference_definitions():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    clean = torch.tensor([[1.0, 1.0, 3.0], [0.0, 0.0, 0.0]])
    label = torch.tensor([0, 2])
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    pc = np.exp(clean.numpy()) / np.exp(clean.numpy()).sum(1, keepdims=True)
    got = point_scores(logits, label, clean)
    assert got["hit"].tolist() == [1.0, 0.0]
    np.testing.assert_allclose(got["prob_diff"], p.max(1) - pc.max(1), rtol=1e-6)
    np.testing.assert_allclose(got["logit_diff"], [2.0 - 3.0, 3.0 - 0.0])
    # log(p_label / p_second): the second-largest probability, whatever the label's rank
    np.testing.assert_allclose(got["log_odds"], np.log([p[0, 0] / p[0, 1], p[1, 2] / p[1, 2]]), atol=1e-6)


def test_removed_pixel_counts_are_the_references():
    # the reference: k = int(base_size * step), base 224*224 for --scale per, 100 for --scale 100
    per = [int(224 * 224 * s) for s in [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]]
    hundred = [int(100 * s) for s in [5, 10, 15, 20, 25, 30, 35, 40, 45]]
    assert removal_counts("per", 224 * 224) == per == [5017, 10035, 15052, 20070, 25088, 30105, 35123,
                                                        40140, 45158]
    assert removal_counts("100", 224 * 224) == hundred
    assert removal_fractions("per", 224 * 224) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert removal_fractions("100", 224 * 224) == [k / 224 ** 2 for k in hundred]
    # and exactly k pixels (all 3 channels) are zeroed at each step
    pixels = torch.rand(1, 3, 224, 224) * 0.9 + 0.1
    vis = torch.rand(1, 224, 224)
    for k in per + hundred:
        out = remove_pixels(pixels, removal_order(vis, k, "positive"))
        zero = out == 0
        assert int(zero.all(1).sum()) == k and int(zero.any(1).sum()) == k


def test_map_order_ties_and_negation_follow_torch_topk():
    raw = torch.rand(1, 14, 14)
    ref = F.interpolate(raw[:, None], scale_factor=16, mode="bilinear")  # generate_visualizations.py
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    vis = reference_maps(raw, (224, 224))
    assert torch.equal(vis, ref[:, 0])
    flat = ref.reshape(1, -1)
    assert flat.unique().numel() < flat.numel()  # the 8-pixel border bands repeat values: ties exist
    for k in (5017, 45158):
        assert torch.equal(removal_order(vis, k, "positive"), torch.topk(flat, k, dim=-1)[1])
        assert torch.equal(removal_order(vis, k, "negative"), torch.topk(-flat, k, dim=-1)[1])
    flat_map = torch.zeros(1, 4, 4)
    assert removal_order(flat_map, 5, "positive", "raster").tolist() == [[0, 1, 2, 3, 4]]


def test_auc_is_the_authors_trapezoid():
    y = [0.81432, 0.63016, 0.47856, 0.34242, 0.22296, 0.13578, 0.0724, 0.03388, 0.01356, 0.00464]
    x = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    closed = y + [0.0]
    authors = sum((closed[i] + closed[i + 1]) / 2 * 0.1 for i in range(10))
    assert curve_auc(x, y, close_at_one=True) == pytest.approx(authors, abs=1e-12)
    assert curve_auc(x, y) == pytest.approx(authors - y[-1] / 2 * 0.1, abs=1e-12)


# --- the study's input checks (before any work) --------------------------------------------------


class Labelled:
    classnames = ["cat", "dog", "car"]
    image_size = 224

    class R:
        def __init__(self, label):
            self.label = label

    records = [R(0), R(2)]


class CaptionsOnly(Labelled):
    classnames = None
    records = [Labelled.R(-1)]


@pytest.mark.parametrize("kwargs, data, match", [
    ({}, CaptionsOnly, "no class names"),
    ({"classes": ["cat", "dog"], "target": "gt"}, CaptionsOnly, "need class labels"),
    ({"classes": ["cat", "dog"], "target": "pred", "against": "gt"}, CaptionsOnly, "need class labels"),
    ({"scale": "100", "steps": [100, 600]}, Labelled, "remove"),
    ({"classes": ["cat", "dog"]}, Labelled, "not in study.classes"),
])
def test_bad_data_is_one_clear_error_before_the_model(kwargs, data, match):
    with pytest.raises(ClipXaiError, match=match):
        PerturbationCurveStudy(**kwargs).check_data(data())


@pytest.mark.parametrize("kwargs, match", [
    ({"direction": "up"}, "direction"),
    ({"scale": "50"}, "scale"),
    ({"steps": [0.5, 0.2]}, "remove"),
    ({"steps": [1.5]}, "remove"),
    ({"steps": []}, "empty"),
    ({"target": "caption"}, "target"),
    ({"templates": "fancy"}, "not known"),
    ({"templates": ["no slot"]}, "no {}"),
    ({"prompt": "a photo"}, "prompt"),
    ({"classes": ["one"]}, "class set"),
    ({"close_at_one": "maybe"}, "close_at_one"),
    ({"logit_scale": -1}, "logit_scale"),
    ({"logit_scale": [100]}, "logit_scale"),
    ({"steps": ["a"]}, "study.steps=.*not a list of numbers"),
    ({"steps": 0.5}, "study.steps=.*not a list of numbers"),
    ({"steps": [[0.1]]}, "study.steps=.*not a list of numbers"),
    ({"classes": 5}, "study.classes=5 is not a class set"),
    ({"classes": None}, "class set"),
    ({"wrong_only": True, "against": "pred"}, "wrong_only=true with study.against=pred"),
])
def test_bad_settings_are_one_clear_error(kwargs, match):
    with pytest.raises(ClipXaiError, match=match):
        PerturbationCurveStudy(**kwargs)


def test_schema_entries():
    assert CONDITION_KEYS["perturbation_curve"][:2] == ["curve_variant", "target"]
    assert {"positive", "negative"} <= set(CURVE_HIGHER_IS_BETTER)
    assert all(c in PERTURBATION_CURVE_COLUMNS for k in ("positive", "negative") for c in CURVE_HIGHER_IS_BETTER[k])
    assert not any(CURVE_HIGHER_IS_BETTER["positive"].values()) and all(CURVE_HIGHER_IS_BETTER["negative"].values())


def test_experiment_resolves():
    from hydra import compose, initialize_config_dir

    from clip_xai.config import register_resolvers
    from clip_xai.paths import CONF_DIR

    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=perturbation_tests"], return_hydra_config=True)
    assert cfg.study.name == "perturbation_curve" and cfg.metrics.name == "perturbation_curve"
    assert cfg.dataset.name == "imagenet" and cfg.model.name == "vit_b16" and cfg.study.target == "gt"
    params = cfg.hydra.sweeper.params
    assert params["study.direction"] == "positive,negative"
    assert params["explainer"].split(",") == ["gradcam", "rollout", "chefer", "attnlrp", "legrad", "gem", "eclip",
                                              "game", "maskclip", "surgery"]


# --- one entrypoint run on the tiny model (both directions, sharing the clean maps) and the API --------

NAMES = ["astronaut", "chelsea", "coffee"]
CLASSES = ["cat", "dog", "astronaut", "coffee"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    from tests.helpers import run_cli

    out = tmp_path_factory.mktemp("curve")
    res = run_cli(["-m", "model=tiny", "dataset=sample", f"+dataset.names=[{','.join(NAMES)}]", "logger=none",
                   "device=cpu", "study=perturbation_curve", "explainer=gradcam", f"study.classes=[{','.join(CLASSES)}]",
                   "study.target=pred", "study.against=pred", "study.direction=positive,negative",
                   f"output_root={out}", "name=curve"])
    assert res.returncode == 0, res.stderr[-3000:]
    frames = {}
    for results in (out / "curve").rglob("results.parquet"):
        df = pd.read_parquet(results)
        frames[df.curve_variant.iloc[0]] = (df, json.loads((results.parent / "summary.json").read_text()))
    return frames


@pytest.mark.slow
def test_entrypoint_rows_and_shared_clean_maps(cli_run):
    import clip_xai
    from clip_xai.data import SampleDataset, collate
    from clip_xai.models.zeroshot import ZeroShotHead

    assert set(cli_run) == {"positive", "negative"}
    for df, summary in cli_run.values():
        assert list(df.columns[: len(PERTURBATION_CURVE_COLUMNS)]) == PERTURBATION_CURVE_COLUMNS
        assert df.sample_id.tolist() == NAMES and (df.map_flag == "").all()
        for col in ("curve_fraction", "curve_hit", "curve_prob_diff", "curve_logit_diff", "curve_log_odds"):
            assert all(len(v) == 10 for v in df[col])
        assert df.curve_fraction.iloc[0].tolist() == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
        # against=pred: the clean point is a hit by construction; AUCs are finite
        assert all(v[0] == 1.0 for v in df.curve_hit) and np.isfinite(df.auc_hit).all()
        assert json.loads(df.curve_params.iloc[0])["templates"] == "simple"
        assert summary["perturbation_curve"]["removed_pixels"] == removal_counts("per", 224 * 224)
    assert sum(s.get("cache_hits", 0) for _, s in cli_run.values()) == 3  # the second direction reuses the maps
    # the explained class is the clean zero-shot top-1 of the same head on the same pixels
    model = clip_xai.load_model("tiny", device="cpu")
    ds = SampleDataset(names=NAMES)
    batch, _, _ = collate([ds[i] for i in range(len(ds))])
    pred = ZeroShotHead(CLASSES, "simple").predict(model, batch.pixels).tolist()
    assert cli_run["positive"][0].caption.tolist() == [f"a photo of a {CLASSES[i]}" for i in pred]


@pytest.mark.slow
def test_api_rows_equal_the_entrypoints(cli_run):
    import clip_xai
    from PIL import Image

    from clip_xai.data.sample import _load_skimage

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the entrypoint (tests.helpers.run_cli): the same float reductions
    try:
        model = clip_xai.load_model("tiny", device="cpu")
        photos = [Image.fromarray(_load_skimage(n)) for n in NAMES]
        rows = clip_xai.faithfulness_curves(model, photos, method="gradcam", class_names=CLASSES,
                                            direction="positive", sample_ids=NAMES,
                                            study_params={"target": "pred", "against": "pred"})
    finally:
        torch.set_num_threads(before)
    cli = cli_run["positive"][0]
    assert list(rows.columns) == list(cli.columns) and (rows.dataset == "memory").all()
    same = [c for c in PERTURBATION_CURVE_COLUMNS if c not in ("dataset",)]
    for c in same:
        assert rows[c].map(lambda v: np.asarray(v).tolist()).tolist() == cli[c].map(lambda v: np.asarray(v).tolist()).tolist(), c


def test_api_refuses_bad_input_before_any_image_is_read(tmp_path):
    import clip_xai

    model = clip_xai.load_model("tiny", device="cpu")
    missing = [str(tmp_path / "nope.png")] * 2  # a path check would fail only when images are decoded
    (tmp_path / "nope.png").write_bytes(b"not an image")
    cases = [
        (dict(class_names=["cat"]), "at least two"),
        (dict(class_names="birds"), "not a list"),
        (dict(class_names=CLASSES, labels=[0]), "labels must be 2"),
        (dict(class_names=CLASSES, labels=[0, 9]), "labels must be 2"),
        (dict(class_names=CLASSES, labels=[0, "a"]), "labels must be 2"),
        (dict(class_names=CLASSES, labels=[0, None]), "labels must be 2"),
        (dict(class_names=CLASSES, labels=[0, 0.5]), "labels must be 2"),
        (dict(class_names=CLASSES, labels=[0, True]), "labels must be 2"),
        (dict(class_names=CLASSES), "need class labels"),  # target=pred/against=gt by default: labels needed
        (dict(class_names=CLASSES, labels=[0, 1], protocol="roar"), "unknown curve protocol"),
        (dict(class_names=CLASSES, labels=[0, 1], direction="up"), "direction"),
        (dict(class_names=CLASSES, labels=[0, 1], study_params={"scale": "7"}), "scale"),
        (dict(class_names=CLASSES, labels=[0, 1], study_params={"classes": ["a", "b"]}), "class_names"),
        (dict(class_names=CLASSES, labels=[0, 1], study_params={"colour": 1}), "no setting 'colour'"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ClipXaiError, match=match):
            clip_xai.faithfulness_curves(model, missing, method="gradcam", **kwargs)


def test_list_columns_survive_the_parquet_sink_and_resume(tmp_path):
    from clip_xai.sinks.results import ResultsWriter

    cols = PERTURBATION_CURVE_COLUMNS
    study = PerturbationCurveStudy(classes=["a", "b"])

    def row(sid, n):
        r = {c: float("nan") for c in cols}
        r.update(sample_id=sid, curve_fraction=[0.0, 0.1, 0.2][:n], curve_hit=[1.0, 0.0, 1.0][:n], map_flag="")
        return r

    first = ResultsWriter(tmp_path, cols)
    first.append([row("a", 3)])
    resumed = ResultsWriter(tmp_path, cols)  # a second run of the same command reads the file back
    assert resumed.done_ids() == {"a"}
    empty = study.empty_row(type("Ctx", (), {"ids": {}})(), "c", "", -1, "bad_image")
    resumed.append([row("b", 3), {**{c: float("nan") for c in cols}, **empty}])
    back = pd.read_parquet(tmp_path / "results.parquet")
    assert [np.asarray(v).tolist() for v in back.curve_hit] == [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0], []]
    assert back.map_flag.tolist() == ["", "", "bad_image"]
