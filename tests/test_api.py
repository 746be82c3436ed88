"""The Python API (clip_xai.api): same numbers as the command line, clear errors before any work.

The API's maps and rows are checked against (a) the real entrypoint run as a subprocess on the
same photos (its saved example maps and results.parquet) and (b) explainers and perturbations
built here straight from their yaml files and called directly.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from PIL import Image

import clip_xai
from clip_xai import api
from clip_xai.config import build, sample_seed
from clip_xai.data.sample import SAMPLE_CAPTIONS, _load_skimage
from clip_xai.errors import ClipXaiError
from clip_xai.explainers.postprocess import image_maps, text_maps
from clip_xai.schema import FAITHFULNESS_COLUMNS, RUN_COLUMNS, SENSITIVITY_COLUMNS
from tests.helpers import compose_cfg, run_cli

NAMES = ["astronaut", "chelsea", "coffee"]


@pytest.fixture(scope="module")
def model():
    return clip_xai.load_model("tiny", device="cpu")


@pytest.fixture(scope="module")
def photos():
    """Three sample photos as PIL images (original size) and their captions."""
    return [Image.fromarray(_load_skimage(n)) for n in NAMES], [SAMPLE_CAPTIONS[n] for n in NAMES]


@pytest.fixture(scope="module")
def pixels(photos):
    """The photos preprocessed by the sample dataset itself: (3,3,224,224) in [0,1]."""
    from clip_xai.data import SampleDataset, collate

    ds = SampleDataset(names=NAMES)
    return collate([ds[i] for i in range(len(ds))])[0].pixels


def direct(group: str, option: str, **settings):
    """An explainer/perturbation built here from the CLI's composed config, bypassing the API."""
    cfg = compose_cfg([f"{group}={option}", *(f"{group}.{k}={v}" for k, v in settings.items())])
    return build(cfg, group)


# --- package surface --------------------------------------------------------------------------


def test_import_is_cheap_and_exports_the_api():
    code = "import sys, clip_xai; print('torch' in sys.modules, 'hydra' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    for name in ("load_model", "explain", "perturb", "sensitivity", "faithfulness", "faithfulness_curves", "show",
                 "TokenScores"):
        assert getattr(clip_xai, name) is getattr(api, name)
        assert name in dir(clip_xai)
    assert clip_xai.ClipXaiError is ClipXaiError
    with pytest.raises(AttributeError):
        clip_xai.nope  # noqa: B018


def test_load_model_overrides_are_the_model_options_keys(model):
    assert model.name == "tiny" and model.device.type == "cpu" and not model.training
    reseeded = clip_xai.load_model("tiny", device="cpu", seed=1)
    w0, w1 = (next(m.model.visual.parameters()) for m in (model, reseeded))
    assert not torch.equal(w0, w1)  # seed= is the option's own key (random weights drawn from it)
    assert torch.equal(w0, next(clip_xai.load_model("tiny", device="cpu").model.visual.parameters()))
    with pytest.raises(ClipXaiError, match="unknown model 'vit_b99'.*(?s:.*)tiny.*vit_b16"):
        clip_xai.load_model("vit_b99")
    with pytest.raises(ClipXaiError, match="model tiny has no setting 'archh'(?s:.*)arch, pretrained"):
        clip_xai.load_model("tiny", archh="x")


def test_composed_defaults_are_the_cli_config():
    cli = compose_cfg(["explainer=rise", "explainer.n_masks=64", "perturbation=pgd"])
    mine = api._config({"explainer": "rise", "perturbation": "pgd"}, {"explainer": {"n_masks": 64}})
    for group in ("explainer", "perturbation", "metrics", "model"):
        assert OmegaConf.to_container(mine[group], resolve=True) == OmegaConf.to_container(cli[group], resolve=True)
    assert mine.seed == cli.seed and mine.precision == cli.precision and mine.batch_size == cli.batch_size


# --- API = CLI --------------------------------------------------------------------------------


@pytest.fixture()
def one_thread():
    """The entrypoint runs with OMP_NUM_THREADS=1 (tests.helpers.run_cli); the API side matches it,
    so float reductions happen in the same order and the numbers can be compared exactly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_api_equals_cli_example_maps_and_rows(model, photos, tmp_path, one_thread):
    """The real entrypoint on the sample photos: its saved example maps and rows are the API's."""
    res = run_cli(["model=tiny", "dataset=sample", "+dataset.names=[astronaut,chelsea,coffee]", "explainer=eclip",
                   "save_examples=3", "logger=none", "device=cpu", f"output_root={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    (run_dir,) = [p.parent for p in tmp_path.rglob("examples.npz")]
    ex = np.load(run_dir / "examples.npz")
    assert ex["sample_id"].tolist() == NAMES
    images, texts = photos
    paths = []
    for name, img in zip(NAMES[:2], images[:2]):  # two as files (lossless PNG), one as a PIL image
        paths.append(tmp_path / f"{name}.png")
        img.save(paths[-1])
    maps = clip_xai.explain(model, [*paths, images[2]], texts, method="eclip")
    assert maps.shape == (3, 224, 224) and maps.dtype == torch.float32
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    saved = torch.from_numpy(ex["map_clean"])
    assert torch.equal(maps.half(), saved)  # the CLI stores float16: identical after the same rounding

    cli_rows = pd.read_parquet(run_dir / "results.parquet")
    rows = clip_xai.sensitivity(model, images, texts, method="eclip")
    assert list(rows.columns) == list(cli_rows.columns) == SENSITIVITY_COLUMNS + RUN_COLUMNS
    assert rows["sample_id"].tolist() == ["0", "1", "2"] and (rows["dataset"] == "memory").all()
    same = ["caption", "model", "explainer", "modality", "study", "seed", "perturbation", "perturbation_params", "eps",
            "linf", "clamped", "sim_orig", "sim_pert", "sim_diff", "spearman", "ssim", "topk", "sparseness",
            "complexity", "sparseness_pert", "complexity_pert", "map_flag", "caption_flag"]
    pd.testing.assert_frame_equal(rows[same], cli_rows[same], check_exact=True)
    assert rows.attrs["summaries"][0]["counts"]["rows"] == 3


@pytest.mark.slow
def test_faithfulness_rows_equal_cli(model, photos, tmp_path, one_thread):
    res = run_cli(["model=tiny", "dataset=sample", "+dataset.names=[astronaut,chelsea]", "study=faithfulness",
                   "explainer=selfattn", "metrics.road_percentages=[20,50,80]", "logger=none", "device=cpu",
                   f"output_root={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    (results,) = tmp_path.rglob("results.parquet")
    cli_rows = pd.read_parquet(results)
    images, texts = photos
    rows = clip_xai.faithfulness(model, images[:2], texts[:2], method="selfattn", sample_ids=NAMES[:2],
                                 metrics_params={"road_percentages": [20, 50, 80]})  # ids seed ROAD's noise
    assert list(rows.columns) == list(cli_rows.columns) == FAITHFULNESS_COLUMNS + RUN_COLUMNS
    assert (rows["modality"] == "image+text").all() and rows["sample_id"].tolist() == NAMES[:2]
    metrics = [c for c in FAITHFULNESS_COLUMNS if c.startswith(("conf_", "road", "sim_", "sparseness", "complexity"))]
    pd.testing.assert_frame_equal(rows[metrics], cli_rows[metrics], check_exact=True)


# --- explain ----------------------------------------------------------------------------------


def test_explain_equals_the_explainer_called_directly(model, photos, pixels):
    images, texts = photos
    gradcam = direct("explainer", "gradcam", layer=-2)
    raw = gradcam(model, pixels, model.tokenize(texts))
    maps = clip_xai.explain(model, images, texts, method="gradcam", layer=-2)
    torch.testing.assert_close(maps, image_maps(raw.float(), (224, 224)), rtol=0, atol=0)
    assert torch.equal(clip_xai.explain(model, images, texts, method="gradcam", layer=-2, raw=True), raw)
    # the default layer is the yaml's (-1): a different map
    assert not torch.equal(clip_xai.explain(model, images, texts, method="gradcam"), maps)


def test_tensor_input_at_model_size_and_other_sizes(model, photos, pixels):
    images, texts = photos
    from_pil = clip_xai.explain(model, images, texts, method="selfattn")
    assert torch.equal(clip_xai.explain(model, pixels, texts, method="selfattn"), from_pil)
    assert torch.equal(clip_xai.explain(model, pixels[0], texts[0], method="selfattn"), from_pil[:1])  # one image
    small = torch.nn.functional.interpolate(pixels, size=(112, 96), mode="bilinear", antialias=True).clamp(0, 1)
    maps = clip_xai.explain(model, small, texts, method="selfattn")
    assert maps.shape == (3, 112, 96)  # at the input size
    # the model saw the images resized back to 224 (bicubic), and the map was resized to 112x96
    seen = torch.nn.functional.interpolate(small, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
    raw = direct("explainer", "selfattn")(model, seen, model.tokenize(texts))
    torch.testing.assert_close(maps, image_maps(raw.float(), (112, 96)), rtol=0, atol=0)


def test_seed_and_sample_ids_seed_the_noise(model, photos, pixels):
    images, texts = photos
    rise = dict(method="rise", n_masks=16, chunk=16)
    first = clip_xai.explain(model, images[:2], texts[:2], **rise)
    assert torch.equal(first, clip_xai.explain(model, images[:2], texts[:2], **rise))
    assert not torch.equal(first, clip_xai.explain(model, images[:2], texts[:2], seed=1, **rise))  # masks from seed
    swapped = clip_xai.perturb(model, images[:2], texts[:2], kind="noise", eps=0.05, sample_ids=["b", "a"])
    seeds = torch.tensor([sample_seed(0, "b"), sample_seed(0, "a")])
    noise = direct("perturbation", "noise", eps=0.05)
    assert torch.equal(swapped, noise(model, pixels[:2], model.tokenize(texts[:2]), seeds))
    unseeded = dict(rise, mask_seed=None)  # masks from torch's global generator, seeded per call as per CLI run
    state = torch.random.get_rng_state()
    assert torch.equal(clip_xai.explain(model, images[:1], texts[:1], **unseeded),
                       clip_xai.explain(model, images[:1], texts[:1], **unseeded))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is left alone
    with pytest.raises(ClipXaiError, match="sample_ids must be 2 distinct ids"):
        clip_xai.explain(model, images[:2], texts[:2], sample_ids=["a", "a"])
    with pytest.raises(ClipXaiError, match="seed must be an integer"):
        clip_xai.explain(model, images[:2], texts[:2], seed="x")


def test_text_scores_are_tokens_with_their_scores(model, photos, pixels):
    images, texts = photos
    scores = clip_xai.explain(model, images, texts, method="selfattn", modality="text")
    assert isinstance(scores, clip_xai.TokenScores) and len(scores) == 3 and scores.texts == texts
    assert scores.tokens == [t.split() for t in texts]  # plain words: one BPE token each
    tokens = model.tokenize(texts)
    raw = direct("explainer", "selfattn", modality="text")(model, pixels, tokens)
    expected = text_maps(raw.float(), tokens.content_mask)
    for i, text in enumerate(texts):
        n = len(text.split())
        assert scores.positions[i].tolist() == list(range(1, n + 1))  # after the start token
        torch.testing.assert_close(scores.scores[i], expected[i, 1 : n + 1], rtol=0, atol=0)
        assert float(scores.scores[i].max()) == 1.0 and float(scores.scores[i].min()) == 0.0
    assert scores.pairs(1)[-1] == ("cat", scores.scores[1][-1].item())
    raw_scores = clip_xai.explain(model, images, texts, method="selfattn", modality="text", raw=True)
    assert raw_scores.raw and torch.equal(raw_scores.scores[0], raw[0, 1:6].float())


def test_text_tokens_on_a_hugging_face_tokenizer(altclip_tiny, photos):
    """AltCLIP (XLM-R pieces; the offline test tokenizer splits into characters): tokens spell the caption."""
    images, texts = photos
    scores = clip_xai.explain(altclip_tiny, images[:1], texts[:1], method="selfattn", modality="text")
    assert "".join(scores.tokens[0]).replace("▁", " ").strip() == texts[0]
    assert len(scores.scores[0]) == len(scores.tokens[0]) == len(scores.positions[0])


def test_constant_maps_are_reported(model, photos, caplog):
    """eclip's text maps are all zero on two of these photos with the random tiny model: said, not hidden."""
    images, texts = photos
    with caplog.at_level("WARNING", logger="clip_xai.api"):
        scores = clip_xai.explain(model, images, texts, method="eclip", modality="text")
    constant = [i for i in range(3) if float(scores.scores[i].max()) == 0.0]
    assert constant, "expected a constant text map on the random model (this test checks the warning)"
    assert f"{len(constant)} of 3 maps are constant" in caplog.text and str(constant) in caplog.text


# --- perturb ----------------------------------------------------------------------------------


def test_perturb_is_the_configured_perturbation(model, photos, pixels):
    images, texts = photos
    tokens = model.tokenize(texts)
    out = clip_xai.perturb(model, images, texts)  # fgsm at the yaml's eps
    fgsm = direct("perturbation", "fgsm")
    assert fgsm.eps == 0.0314
    assert torch.equal(out, fgsm(model, pixels, tokens))
    assert float((out - pixels).abs().max()) <= 0.0314 + 1e-6
    pgd = clip_xai.perturb(model, images, texts, kind="pgd", eps=4 / 255, steps=3)
    assert torch.equal(pgd, direct("perturbation", "pgd", eps=4 / 255, steps=3)(model, pixels, tokens))
    noise = clip_xai.perturb(model, images, texts, kind="noise", eps=0.05)
    seeds = torch.tensor([sample_seed(0, str(i)) for i in range(3)])  # sample i is sample id "i"
    assert torch.equal(noise, direct("perturbation", "noise", eps=0.05)(model, pixels, tokens, seeds))
    assert not torch.equal(noise[0] - pixels[0], noise[1] - pixels[1])  # each sample its own draw


# --- studies ----------------------------------------------------------------------------------


def test_sensitivity_sweep_shares_clean_maps_and_labels_eps(model, photos):
    images, texts = photos
    rows = clip_xai.sensitivity(model, images[:2], texts[:2], method="selfattn", eps=[4 / 255, 8 / 255],
                                metrics_params={"k": 50})
    assert list(rows.columns) == SENSITIVITY_COLUMNS + RUN_COLUMNS and len(rows) == 4
    assert rows["eps"].tolist() == pytest.approx([4 / 255] * 2 + [8 / 255] * 2)
    assert (rows["linf"] <= rows["eps"] + 1e-6).all() and (rows["perturbation"] == "fgsm").all()
    second = rows.attrs["summaries"][1]
    assert second["cache_hits"] == 2 and second["cache_misses"] == 0  # clean maps computed once
    one = clip_xai.sensitivity(model, images[:2], texts[:2], method="selfattn", eps=8 / 255, metrics_params={"k": 50})
    cols = ["spearman", "ssim", "topk", "sim_orig", "sim_pert"]
    pd.testing.assert_frame_equal(one[cols], rows[cols].iloc[2:].reset_index(drop=True), check_exact=True)


# --- show -------------------------------------------------------------------------------------


def test_show_draws_one_row_per_image(model, photos):
    images, texts = photos
    maps = {m: clip_xai.explain(model, images, texts, method=m) for m in ("gradcam", "selfattn")}
    fig = clip_xai.show(images, maps, texts)
    assert isinstance(fig, Figure) and len(fig.axes) == 6
    assert [ax.get_title() for ax in fig.axes[:2]] == ["gradcam", "selfattn"]
    shown = fig.axes[0].get_images()[0].get_array()
    assert shown.shape == (224, 224, 3)
    scores = clip_xai.explain(model, images, texts, method="selfattn", modality="text")
    fig = clip_xai.show(images, scores, texts)
    assert len(fig.axes) == 6  # image, then the token strip
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == texts[0].split()
    strip = fig.axes[1].get_images()[0].get_array()
    np.testing.assert_array_equal(strip[0], scores.scores[0].numpy())
    assert len(clip_xai.show(None, maps["gradcam"]).axes) == 3
    with pytest.raises(ClipXaiError, match="2 image"):
        clip_xai.show(images[:2], maps["gradcam"])
    with pytest.raises(ClipXaiError, match="must be"):
        clip_xai.show(images, maps["gradcam"][0])


# --- errors before any work -------------------------------------------------------------------


@pytest.fixture()
def tripwire(model, monkeypatch):
    """Fails the test if an image is decoded or either tower runs."""
    def boom(*a, **k):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(model.vision, "forward", boom)
    monkeypatch.setattr(model.text, "forward", boom)
    monkeypatch.setattr(api, "_decode", boom)
    return model


@pytest.mark.parametrize("call", [
    lambda m, i, t: clip_xai.explain(m, i, t, method="nope"),
    lambda m, i, t: clip_xai.sensitivity(m, i, t, method="nope"),
    lambda m, i, t: clip_xai.faithfulness(m, i, t, method="nope"),
    lambda m, i, t: clip_xai.perturb(m, i, t, method="nope", kind="map_attack"),
])
def test_unknown_method_lists_the_options(tripwire, photos, call):
    with pytest.raises(ClipXaiError) as err:
        call(tripwire, *photos)
    assert "unknown method 'nope'" in err.value.problem
    for option in ("eclip", "gradcam", "rise", "selfattn", "m2ib"):
        assert option in err.value.fix


def test_bad_settings_are_refused(tripwire, photos):
    images, texts = photos
    with pytest.raises(ClipXaiError, match="method gradcam has no setting 'n_masks'") as err:
        clip_xai.explain(tripwire, images, texts, method="gradcam", n_masks=10)
    assert "layer" in err.value.fix
    with pytest.raises(ClipXaiError, match="unknown perturbation 'fgsmm'.*(?s:.*)fgsm, map_attack, map_attack_transfer, noise, pgd, xshift"):
        clip_xai.perturb(tripwire, images, texts, kind="fgsmm")
    with pytest.raises(ClipXaiError, match="eps=2"):
        clip_xai.perturb(tripwire, images, texts, eps=2)
    with pytest.raises(ClipXaiError, match="perturbation_params holds 'eps'"):
        clip_xai.sensitivity(tripwire, images, texts, perturbation_params={"eps": 0.1})  # eps= is its own argument
    with pytest.raises(ClipXaiError, match="perturbation=map_attack needs the gradient of the map"):
        clip_xai.sensitivity(tripwire, images, texts, method="rise", perturbation="map_attack")  # the study's check
    with pytest.raises(ClipXaiError, match="metrics faithfulness has no setting 'k'"):
        clip_xai.faithfulness(tripwire, images, texts, metrics_params={"k": 3})
    with pytest.raises(ClipXaiError, match="cannot set"):
        clip_xai.explain(tripwire, images, texts, method="gradcam", layer=torch.tensor(1))


def test_unsupported_modality(tripwire, photos):
    images, texts = photos
    with pytest.raises(ClipXaiError, match="explainer gradcam has no text maps"):
        clip_xai.explain(tripwire, images, texts, method="gradcam", modality="text")
    with pytest.raises(ClipXaiError, match="unknown modality 'video'"):
        clip_xai.explain(tripwire, images, texts, modality="video")
    with pytest.raises(ClipXaiError, match="study=sensitivity compares image maps"):
        clip_xai.sensitivity(tripwire, images, texts, modality="text")


@pytest.mark.parametrize("images, problem", [
    (42, "images must be PIL images, image file paths or a \\(B,3,H,W\\) tensor, got int"),
    ([np.zeros((8, 8, 3), np.uint8)] * 3, "image 0 is a ndarray"),
    ([torch.rand(3, 8, 8)] * 3, "image 0 is a Tensor"),
    (torch.rand(3, 1, 8, 8), "must be \\(B,3,H,W\\)"),
    ((torch.rand(3, 3, 8, 8) * 255).byte(), "must hold floats"),
    (torch.rand(3, 3, 8, 8) * 2, "finite values in \\[0,1\\]"),
    (["/no/such/image.png"] * 3, "image file not found"),
    ([], "no images were given"),
])
def test_wrong_images(tripwire, photos, images, problem):
    with pytest.raises(ClipXaiError, match=problem):
        clip_xai.explain(tripwire, images, photos[1])


def test_mismatched_lengths_and_texts(tripwire, photos):
    images, texts = photos
    with pytest.raises(ClipXaiError, match="3 image\\(s\\) but 2 text\\(s\\)"):
        clip_xai.explain(tripwire, images, texts[:2])
    with pytest.raises(ClipXaiError, match="3 image\\(s\\) but 2 text\\(s\\)"):
        clip_xai.faithfulness(tripwire, images, texts[:2])
    with pytest.raises(ClipXaiError, match="texts must be a list of strings"):
        clip_xai.explain(tripwire, images, [1, 2, 3])
    with pytest.raises(ClipXaiError, match="caption too long"):
        clip_xai.explain(tripwire, images[:1], ["word " * 100])
    with pytest.raises(ClipXaiError, match="model must be a clip_xai model adapter"):
        clip_xai.explain(object(), images, texts)


def test_unreadable_file_is_a_clear_error(model, photos, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ClipXaiError, match="cannot read image .*bad.png"):
        clip_xai.explain(model, [bad], photos[1][:1])
