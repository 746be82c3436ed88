"""Deletion/insertion (Grad-ECLIP's protocol): pixel schedule, colours, known-answer curves, errors, entrypoint."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from clip_xai.data.base import ImageCaptionDataset, Record
from clip_xai.errors import ClipXaiError
from clip_xai.metrics.faithfulness import deletion_insertion as di
from clip_xai.schema import CURVE_HIGHER_IS_BETTER, DELETION_INSERTION_COLUMNS, RUN_COLUMNS
from clip_xai.studies.base import RunContext
from clip_xai.studies.deletion_insertion import CURVE_COLUMNS, DeletionInsertionStudy
from tests.helpers import run_cli


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# -- schedule -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", di.MODES)
def test_changed_pixels_follow_the_reference_formula(mode):
    h, w, steps, every = 37, 53, 20, 4
    white = torch.full((h, w, 3), 255, dtype=torch.uint8)  # random colours are < 255: every change shows
    order = torch.from_numpy(np.random.default_rng(1).permutation(h * w))
    imgs, counts = di.curve_images(white, order, mode, steps, every, di.colour_generator(3))
    per = max(1, int(h * w / (2 * steps)))  # the reference's pixel_once
    assert per == di.pixels_per_step(h * w, steps) == 49
    assert counts == [s * per for s in range(every, steps + 1, every)]
    for img, n in zip(imgs, counts):
        changed = (img != 255).any(-1) if mode == "deletion" else (img != 0).any(-1)
        assert int(changed.sum()) == n
        assert set(changed.flatten().nonzero().flatten().tolist()) == set(order[:n].tolist())  # map order


def test_full_schedule_insertion_gives_back_the_image_and_ties_follow_numpy():
    img = _image(4, 5)  # area 20, 20 steps: max(1, int(20 / 40)) = 1 pixel per step, every pixel by the end
    heat = torch.tensor(np.random.default_rng(2).integers(0, 3, (4, 5)), dtype=torch.float32)  # many ties
    order = di.pixel_order(heat)
    assert order.tolist() == np.argsort(-heat.numpy().reshape(-1)).tolist()
    imgs, counts = di.curve_images(img, order, "insertion", 20, 20)
    assert counts == [20] and torch.equal(imgs[-1], img)


def test_deletion_colours_are_the_reference_draws_and_reproducible():
    img, steps, every = _image(20, 30), 10, 5
    order = torch.from_numpy(np.random.default_rng(4).permutation(600))
    a, _ = di.curve_images(img, order, "deletion", steps, every, di.colour_generator(7))
    b, _ = di.curve_images(img, order, "deletion", steps, every, di.colour_generator(7))
    c, _ = di.curve_images(img, order, "deletion", steps, every, di.colour_generator(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # independent: the reference's global-RNG draws, seeded, written into a numpy uint8 array
    torch.manual_seed(7)
    ref = img.numpy().copy().reshape(-1, 3)
    per = max(1, int(600 / (2 * steps)))
    for step in range(1, steps + 1):
        ref[order[(step - 1) * per: step * per].numpy()] = (torch.rand(per, 3) * 255.0).numpy()  # numpy's cast truncates
    assert np.array_equal(a[-1].numpy().reshape(-1, 3), ref)
    written = a[-1].reshape(-1, 3)[order[: per * steps]]
    assert int(written.max()) <= 254  # floor(U[0,1) * 255): 255 never drawn
    assert torch.equal(a[-1].reshape(-1, 3)[order[per * steps:]], img.reshape(-1, 3)[order[per * steps:]])


def test_auc_is_the_unit_spaced_trapezoid():
    assert di.curve_auc([1, 0]) == 0.5
    assert di.curve_auc([1, 1, 0, 0]) == pytest.approx(np.trapezoid([1, 1, 0, 0], dx=1 / 3))
    assert np.isnan(di.curve_auc([1]))


# -- known answer: class evidence in one region ---------------------------------------------------
REGION = (slice(0, 16), slice(0, 32))  # top-left eighth of a 64×64 image: pure red
CLASSES = [f"c{i}" for i in range(12)]


class RedHead:
    """Zero-shot head stand-in: class 0's logit is the redness of REGION in the 224 crop; the other
    classes have fixed logits just below a fully red region, so class 0 drops to last once it fades."""

    class_names, templates = tuple(CLASSES), ("{}",)

    def image_logits(self, model, pixels):
        px = pixels[:, :, : 56, : 112]  # REGION in the 224 crop of a 64×64 image
        red = (px[:, 0] - (px[:, 1] + px[:, 2]) / 2).mean((1, 2))
        rest = torch.linspace(0.9, 0.5, len(CLASSES) - 1).expand(len(pixels), -1)
        return torch.cat([red[:, None], rest], 1)


class FixedMap:
    name, modality = "fixed", "image"

    def __init__(self, grid):
        self.grid = grid

    def __call__(self, model, pixels, tokens, seeds):
        return self.grid[None].clone()

    def check_requirements(self, model):
        pass

    def check_model(self, model):
        pass


def _red_image() -> np.ndarray:
    img = np.full((64, 64, 3), 128, dtype=np.uint8)
    img[REGION] = (255, 0, 0)
    return img


@pytest.fixture(scope="module")
def red_setup():
    img = _red_image()
    ds = ImageCaptionDataset([Record("red", img, "c0", label=0)], classnames=CLASSES)
    model = SimpleNamespace(name="fake", patch_size=8, tokenize=lambda caps: SimpleNamespace(to=lambda d: None))
    region = torch.zeros(8, 8)
    region[:2, :4] = 1.0
    return img, ds, model, region


def _curves(red_setup, mode, grid):
    img, ds, model, _ = red_setup
    study = DeletionInsertionStudy(mode=mode, map_size="224", steps=100, eval_every=10, templates="simple")
    study.check_data(ds)
    study.head = RedHead()
    ctx = RunContext(run_dir=None, device=torch.device("cpu"), model=model, dataset=ds, explainer=FixedMap(grid),
                     metrics=None, ids={})
    out, flag = study.sample_curves(ctx, img, 0, torch.tensor([5]), "red")
    assert flag == ""
    return out


@pytest.mark.parametrize("mode", di.MODES)
def test_map_on_the_evidence_beats_its_negation(red_setup, mode):
    region = red_setup[3]
    on, off = _curves(red_setup, mode, region), _curves(red_setup, mode, 1 - region)
    clean = 0 if mode == "deletion" else -1
    for out in (on, off):
        assert len(out["curve_top1"]) == len(out["curve_fraction"]) == 11
        assert [out[f"curve_top{k}"][clean] for k in (1, 5, 10)] == [1.0, 1.0, 1.0]  # the clean image's hits
        assert out["curve_fraction"][clean] == (0.0 if mode == "deletion" else 1.0)
    for k in (1, 5, 10):
        better = CURVE_HIGHER_IS_BETTER[mode][f"auc_top{k}"]
        assert (on[f"auc_top{k}"] > off[f"auc_top{k}"]) == better, (k, on, off)
    if mode == "deletion":  # the region (1/8 of the image) is gone after 30 % of the steps
        assert on["curve_top1"][4:] == [0.0] * 7 and off["curve_top1"] == [1.0] * 11
    else:  # the negation never inserts the region within half the image: only the clean point hits
        assert off["curve_top1"] == [0.0] * 10 + [1.0] and on["curve_top1"][4:] == [1.0] * 7


# -- bad input: one clear error before any work ---------------------------------------------------
def test_bad_settings_and_data():
    with pytest.raises(ClipXaiError, match="does not divide"):
        DeletionInsertionStudy(steps=100, eval_every=30)
    with pytest.raises(ClipXaiError, match="integer steps"):
        DeletionInsertionStudy(steps=0)
    with pytest.raises(ClipXaiError, match="insertion always"):
        DeletionInsertionStudy(mode="insertion", replacement="black")
    no_names = ImageCaptionDataset([Record("a", _red_image(), "x", label=0)])
    with pytest.raises(ClipXaiError, match="has none"):
        DeletionInsertionStudy(templates="simple").check_data(no_names)
    unlabelled = ImageCaptionDataset([Record("a", _red_image(), "x")], classnames=CLASSES)
    with pytest.raises(ClipXaiError, match="target=gt needs a class label"):
        DeletionInsertionStudy(templates="simple").check_data(unlabelled)
    DeletionInsertionStudy(target="pred", templates="simple").check_data(unlabelled)  # scored against the clean top-1
    with pytest.raises(ClipXaiError, match="top-10 of 3 classes"):
        DeletionInsertionStudy(target="pred", classes=["a", "b", "c"], templates="simple").check_data(unlabelled)


# -- one real run -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("di")
    args = ["name=di", "model=tiny", "dataset.limit=2", "logger=none", "explainer=gradcam", f"output_root={out}",
            "study=deletion_insertion", "study.mode=insertion", "study.target=pred", "study.map_size=224",
            "study.steps=20", "study.templates=simple", f"study.classes=[{','.join(CLASSES)}]", "save_examples=0"]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next(out.glob("di/*/"))
    return pd.read_parquet(run_dir / "results.parquet"), json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_entrypoint_rows(cli_run):
    df, summary = cli_run
    assert list(df.columns) == DELETION_INSERTION_COLUMNS + [c for c in RUN_COLUMNS if c not in DELETION_INSERTION_COLUMNS]
    assert len(df) == 2 and set(df.curve_variant) == {"insertion"} and set(df.target) == {"pred"}
    for _, row in df.iterrows():
        frac = list(row.curve_fraction)
        assert len(frac) == 3 and frac[-1] == 1.0 and frac[0] < frac[1] <= 0.5
        for k in (1, 5, 10):
            curve = list(row[f"curve_top{k}"])
            assert len(curve) == 3 and set(curve) <= {0.0, 1.0} and curve[-1] == 1.0  # scored against the clean top-1
            assert row[f"auc_top{k}"] == pytest.approx(di.curve_auc(curve))
    assert summary["deletion_insertion"]["scored_against"] == "clean_pred"
    assert set(summary["means"]) == {"auc_top1", "auc_top5", "auc_top10"}


def test_cache_shared_by_modes_not_by_targets(tmp_path):
    from tests.helpers import compose_cfg
    from clip_xai.studies.cache import cache_for, cache_key

    def root(*over):
        cfg = compose_cfg(["model=tiny", "study=deletion_insertion", f"output_root={tmp_path}", *over])
        return cache_for(cfg, torch.device("cpu"), "deletion_insertion").root

    assert root("study.mode=deletion") == root("study.mode=insertion")
    assert root("study.target=gt") != root("study.target=pred")
    assert root("study.map_size=own") != root("study.map_size=224")
    sens = compose_cfg(["model=tiny", f"output_root={tmp_path}"])
    assert cache_for(sens, torch.device("cpu"), "sensitivity").root.name == f"gradcam-{cache_key(sens, 'cpu')}"  # unchanged


# -- the Python API: the same rows, at the image's own size ---------------------------------------
DI_API = {"target": "pred", "map_size": "224", "steps": 20, "templates": "simple"}  # the entrypoint run's settings


@pytest.fixture()
def one_thread():
    """One torch thread, as the entrypoint (tests.helpers.run_cli): the same float reductions, and no
    thread contention on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_api_rows_equal_the_entrypoints(cli_run, one_thread):
    import clip_xai
    from PIL import Image

    from clip_xai.data.sample import _load_skimage

    cli, _ = cli_run
    photos = [Image.fromarray(_load_skimage(sid)) for sid in cli.sample_id]  # the records' own arrays, own size
    model = clip_xai.load_model("tiny", device="cpu")
    rows = clip_xai.faithfulness_curves(model, photos, method="gradcam", class_names=CLASSES,
                                        protocol="deletion_insertion", mode="insertion",
                                        sample_ids=cli.sample_id.tolist(), study_params=DI_API)
    assert list(rows.columns) == list(cli.columns) and (rows.dataset == "memory").all()
    for c in DELETION_INSERTION_COLUMNS:
        if c not in ("dataset", "caption"):  # the API's captions are the label names ("" without labels)
            assert rows[c].map(lambda v: np.asarray(v).tolist()).tolist() == \
                cli[c].map(lambda v: np.asarray(v).tolist()).tolist(), c
    assert rows.attrs["summaries"][0]["deletion_insertion"]["images_at"] == "own_size"


def test_api_works_at_the_images_own_size(tmp_path, caplog, one_thread, monkeypatch):
    """A 97×61 image given as PIL and as a path: maps at its own size (keep-size model, the summary says
    so), the same curves for both; the same pixels as a tensor have no own size, and that is said."""
    import clip_xai
    from PIL import Image

    h, w = 61, 97
    pil = Image.fromarray(_image(h, w, seed=3).numpy())
    pil.save(tmp_path / "own.png")  # lossless: the path decodes to the same pixels
    model = clip_xai.load_model("tiny", device="cpu", keep_size=True)
    kw = dict(method="gradcam", class_names=CLASSES, protocol="deletion_insertion", mode="insertion",
              study_params={"target": "pred", "steps": 20, "templates": "simple"})  # map_size auto: own for gradcam
    seen = []  # the (H, W) of every image the curve is drawn on
    curve_images = di.curve_images
    monkeypatch.setattr(di, "curve_images", lambda image, *a, **k: seen.append(tuple(image.shape[:2])) or
                        curve_images(image, *a, **k))
    rows = clip_xai.faithfulness_curves(model, [pil, tmp_path / "own.png"], **kw)
    assert seen == [(h, w), (h, w)]
    summary = rows.attrs["summaries"][0]["deletion_insertion"]
    assert (summary["map_size"], summary["images_at"], summary["model_input_samples"]) == ("own", "own_size", 0)

    expected = [10 / 40, 20 / 40, 1.0]  # insertion: the nominal shares at steps 10 and 20 of 20, then the clean image
    for frac in rows.curve_fraction:
        assert np.asarray(frac).tolist() == expected
    for c in CURVE_COLUMNS:  # PIL and path: the same image, so the same curves
        assert np.asarray(rows[c][0]).tolist() == np.asarray(rows[c][1]).tolist(), c

    px = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)[None].float() / 255
    with caplog.at_level("WARNING", logger="clip_xai.studies.deletion_insertion"):
        flat = clip_xai.faithfulness_curves(model, px, **kw)
    assert seen[2:] == [(224, 224)]  # the model's input, as the summary says
    assert np.asarray(flat.curve_fraction[0]).tolist() == expected
    summary = flat.attrs["summaries"][0]["deletion_insertion"]
    assert (summary["images_at"], summary["model_input_samples"]) == ("model_input", 1)
    assert sum("no image at their own size" in r.getMessage() for r in caplog.records) == 1


def test_api_refuses_bad_input_before_any_image_is_read(tiny, tmp_path):
    import clip_xai

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")  # decoding it would fail with another message
    cases = [
        (dict(protocol="deletion_insertion", direction="positive"), "setting of protocol='perturbation_curve'"),
        (dict(mode="deletion"), "setting of protocol='deletion_insertion'"),  # the default protocol
        (dict(protocol="deletion_insertion", study_params={"mode": "insertion"}), "study_params holds 'mode'"),
        (dict(protocol="deletion_insertion", study_params={"direction": "positive"}), "no setting 'direction'"),
        (dict(protocol="deletion_insertion", mode="sideways"), "study.mode='sideways'"),
        (dict(protocol="deletion_insertion", labels=None, study_params={"target": "gt"}), "needs a class label"),
        (dict(protocol="deletion_insertion"), "keep-size mode"),  # map_size auto = own for gradcam
        (dict(protocol="deletion_insertion", study_params={"map_size": "own"}), "keep-size mode"),
    ]
    for kwargs, match in cases:
        kwargs = {"labels": [0, 1], **kwargs}
        with pytest.raises(ClipXaiError, match=match):
            clip_xai.faithfulness_curves(tiny, [junk, junk], method="gradcam", class_names=CLASSES, **kwargs)


# -- labels mapped by name, classes strings, flags, curve_params ---------------------------------
def _ctx(ds, explainer=None):
    return RunContext(run_dir=None, device=torch.device("cpu"), model=None, dataset=ds,
                      explainer=explainer or FixedMap(torch.ones(8, 8)), metrics=None, ids={})


def test_labels_follow_class_names_into_a_user_class_list(monkeypatch):
    """Dataset labels index the dataset's names: with study.classes=[c7, c3] label 3 (c3) is the
    head's class 1, and that class is explained and scored; the row keeps the dataset's label."""
    ds = ImageCaptionDataset([Record("a", _red_image(), "x", label=3), Record("b", _red_image(), "y", label=7)],
                             classnames=CLASSES)
    study = DeletionInsertionStudy(classes=["c7", "c3"], topk=[1], templates="simple")
    study.check_data(ds)
    assert study.head.class_names == ("c7", "c3") and [study.head_label(lb) for lb in (3, 7, -1)] == [1, 0, -1]
    seen = []
    monkeypatch.setattr(study, "sample_curves", lambda ctx, src, label, seeds, sid: (seen.append(label) or {}, ""))
    batch = SimpleNamespace(labels=torch.tensor([3, 7]), sample_ids=["a", "b"], captions=["x", "y"])
    rows, _ = study.process(_ctx(ds), SimpleNamespace(batch=batch, seeds=torch.tensor([0, 1])))
    assert seen == [1, 0] and [r["label"] for r in rows] == [3, 7]
    with pytest.raises(ClipXaiError, match=r"\['c3'\].*not in study.classes"):
        DeletionInsertionStudy(classes=["c7", "c0"], topk=[1], templates="simple").check_data(ds)


def test_classes_strings():
    unlabelled = ImageCaptionDataset([Record("a", _red_image(), "x")], classnames=CLASSES)
    study = DeletionInsertionStudy(target="pred", classes="imagenet", templates="simple")
    study.check_data(unlabelled)
    assert study.head.num_classes == 1000 and study.head.class_names[0] == "tench"
    with pytest.raises(ClipXaiError, match="study.classes='cats' is not known"):
        DeletionInsertionStudy(classes="cats")


@pytest.mark.parametrize("grid, flag", [(torch.full((8, 8), 0.5), "constant_image"),
                                        (torch.full((8, 8), float("nan")), "nan_image")])
def test_unusable_maps_use_the_shared_flag_names(red_setup, grid, flag):
    img, ds, model, _ = red_setup
    study = DeletionInsertionStudy(map_size="224", templates="simple")
    study.check_data(ds)
    study.head = RedHead()
    ctx = RunContext(run_dir=None, device=torch.device("cpu"), model=model, dataset=ds, explainer=FixedMap(grid),
                     metrics=None, ids={})
    out, got = study.sample_curves(ctx, img, 0, torch.tensor([5]), "red")
    assert got == flag and all(out[c] == [] for c in CURVE_COLUMNS)


def test_curve_params_hold_the_measurement_settings():
    ds = ImageCaptionDataset([Record("a", _red_image(), "x", label=0)], classnames=CLASSES)
    a = DeletionInsertionStudy(templates="simple")
    a.check_data(ds)
    b = DeletionInsertionStudy(templates="simple", replacement="black", steps=50)
    b.check_data(ds)
    pa, pb = (json.loads(s.empty_row(_ctx(ds), "a", "x", 0, "bad_image")["curve_params"]) for s in (a, b))
    assert pa["replacement"] == "random" and pa["steps"] == 100 and pa["n_classes"] == 12
    assert (pb["replacement"], pb["steps"]) == ("black", 50)
    # map_size as set (auto: one comparison for every method of a sweep, whatever size each resolves to)
    assert pa["map_size"] == "auto" and pa["own_size_methods"] == ["eclip", "gradcam", "maskclip", "selfattn"]
