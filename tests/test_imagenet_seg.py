"""ImageNet-segmentation: the loader, verify and prepare on a small .mat written here in the official
layout (HDF5 object references, arrays stored transposed), bad files, the experiment, and one
entrypoint run of the localisation study with the segmentation columns."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clip_xai.data import ImageNetSegDataset, SampleDataset
from clip_xai.data.prepare import Options, prepare
from clip_xai.data.verify import verify
from clip_xai.errors import ClipXaiError
from clip_xai.metrics.localisation import pooled_segmentation
from clip_xai.models.preprocess import Preprocess
from clip_xai.paths import CONF_DIR
from clip_xai.schema import SEGMENTATION_COUNTS, SEGMENTATION_METRICS
from clip_xai.studies.localisation import LocalisationStudy
from tests.helpers import compose_cfg, run_cli

h5py = pytest.importorskip("h5py")

H, W = 60, 80
# a 1k class (CLIP name), a 21k synset outside ILSVRC-2012 (WordNet lemma: "organism"), an unknown wnid
IDS = ["n02123394_1043", "n00004475_7", "n09999999_2", "n02123394_88"]


def write_mat(path: Path, n: int = len(IDS), keys=("img", "gt", "id"), ids=IDS) -> tuple[list, list]:
    """A MATLAB v7.3-style file: /value/<key> are (n, 1) object references; images (3, W, H) uint8,
    masks behind a 1x1 cell of references, (W, H); ids as uint16 char columns."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(n)]
    masks = []
    for i in range(n):
        m = np.zeros((H, W), bool)
        m[5 + 5 * i: 45, 10 + 10 * i: 70] = True
        masks.append(m)
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        fields = {k: f.create_dataset(f"value/{k}", (n, 1), dtype=h5py.ref_dtype) for k in keys}
        for i in range(n):
            if "img" in fields:
                fields["img"][i, 0] = refs.create_dataset(f"img{i}", data=images[i].transpose(2, 1, 0)).ref
            if "gt" in fields:
                cell = refs.create_dataset(f"cell{i}", (1, 1), dtype=h5py.ref_dtype)
                cell[0, 0] = refs.create_dataset(f"gt{i}", data=masks[i].astype(np.uint8).T).ref
                fields["gt"][i, 0] = cell.ref
            if "id" in fields:
                chars = np.array([ord(c) for c in ids[i]], dtype=np.uint16)[:, None]
                fields["id"][i, 0] = refs.create_dataset(f"id{i}", data=chars).ref
    return images, masks


@pytest.fixture(scope="module")
def mat(tmp_path_factory) -> tuple[Path, list, list]:
    root = tmp_path_factory.mktemp("imagenet_seg")
    images, masks = write_mat(root / "gtsegs_ijcv.mat")
    return root, images, masks


def test_loader_yields_image_mask_and_class(mat):
    root, images, masks = mat
    ds = ImageNetSegDataset(root)
    assert ds.sample_ids == ["0000_n02123394", "0001_n00004475", "0002_n09999999", "0003_n02123394"]
    assert [r.caption for r in ds.records] == ["a photo of a Persian cat", "a photo of a organism",
                                               "a photo of a n09999999", "a photo of a Persian cat"]
    assert ds.wnids == ["n00004475", "n02123394", "n09999999"] and [r.label for r in ds.records] == [1, 0, 2, 1]
    assert "/value/id" in ds.label_source and "1 CLIP ImageNet-1k, 1 WordNet lemma (timm), 1 bare wnid" in ds.label_source
    pre = Preprocess()
    for i in (0, 2):
        item = ds[i]
        from PIL import Image

        assert torch.equal(item["pixels"], pre.pixels(Image.fromarray(images[i])))  # not transposed
        assert torch.equal(item["object_mask"], pre.mask(masks[i], (W, H)))
    assert ImageNetSegDataset(root / "gtsegs_ijcv.mat", limit=2).total_available == 4  # the file as root


def test_bad_files_fail_before_work(tmp_path: Path):
    with pytest.raises(ClipXaiError, match="not found.*expected layout"):
        ImageNetSegDataset(tmp_path)
    write_mat(tmp_path / "gtsegs_ijcv.mat", keys=("img", "id"))
    with pytest.raises(ClipXaiError, match="lacks /value/gt") as err:
        ImageNetSegDataset(tmp_path)
    assert "'id', 'img'" in str(err.value)
    write_mat(tmp_path / "gtsegs_ijcv.mat", keys=("img", "gt"))
    with pytest.raises(ClipXaiError, match="does not say each image's class.*/value/id: absent"):
        ImageNetSegDataset(tmp_path)
    write_mat(tmp_path / "gtsegs_ijcv.mat", ids=["n02123394_1", "cat", "n1", "x"])
    with pytest.raises(ClipXaiError, match="3 of 4 entries name no wnid"):
        ImageNetSegDataset(tmp_path)
    whole = (tmp_path / "gtsegs_ijcv.mat").read_bytes()
    (tmp_path / "gtsegs_ijcv.mat").write_bytes(whole[: len(whole) // 2])  # an interrupted copy
    with pytest.raises(ClipXaiError, match="(?s)cannot open.*download gtsegs_ijcv.mat again"):
        ImageNetSegDataset(tmp_path)
    (tmp_path / "gtsegs_ijcv.mat").write_bytes(b"MATLAB 5.0 MAT-file")  # an old-format .mat
    with pytest.raises(ClipXaiError, match="not an HDF5"):
        ImageNetSegDataset(tmp_path)
    rep = verify("imagenet_seg", tmp_path)
    assert not rep.ok and "unusable file" in rep.problems


def test_dataset_without_masks_is_refused():
    with pytest.raises(ClipXaiError, match="dataset=imagenet_seg") as err:
        LocalisationStudy().check_data(SampleDataset(limit=2))
    assert "has none" in str(err.value)


def test_prepare_and_verify(mat, tmp_path: Path):
    src, _, _ = mat
    rep = prepare("imagenet_seg", tmp_path / "root", Options(archives=[src / "gtsegs_ijcv.mat"], progress=False))
    prov = json.loads((tmp_path / "root" / "provenance.json").read_text())
    import hashlib

    assert prov["sha256"] == hashlib.sha256((src / "gtsegs_ijcv.mat").read_bytes()).hexdigest()
    assert prov["checksum_published"] is False and (src / "gtsegs_ijcv.mat").is_file()  # the user's file stays
    rows = {c.what: c for c in rep.checks}
    assert rows["images"].found == 4 and rows["images"].expected == 4276 and not rows["images"].ok
    assert rows["classes (/value/id)"].found == 3 and rows["sha256 of the file"].ok
    assert set(rep.problems) == set()  # every entry reads back: only the count differs from the official file


def test_experiment_resolves():
    from hydra import compose, initialize_config_dir

    compose_cfg([])  # registers the resolvers
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=imagenet_segmentation"], return_hydra_config=True)
    assert (cfg.dataset.name, cfg.study.name, cfg.metrics.name, cfg.metrics.seg_threshold) == (
        "imagenet_seg", "localisation", "localisation", "mean")
    methods = cfg.hydra.sweeper.params.explainer.split(",")
    assert methods == ["gradcam", "rollout", "chefer", "attnlrp", "legrad", "gem", "eclip", "game", "maskclip", "surgery"]
    assert all((Path(CONF_DIR) / "explainer" / f"{m}.yaml").is_file() for m in methods)


@pytest.fixture(scope="module")
def cli_run(mat, tmp_path_factory) -> Path:
    root, _, _ = mat
    out = tmp_path_factory.mktemp("seg_out")
    res = run_cli(["model=tiny", "study=localisation", "dataset=imagenet_seg", f"dataset.root={root}",
                   "explainer=gradcam", "logger=none", "device=cpu", f"output_root={out}", "name=seg"])
    assert res.returncode == 0, res.stderr[-3000:]
    (path,) = list((out / "seg").rglob("results.parquet"))
    return path.parent


@pytest.mark.slow
def test_entrypoint_rows(cli_run: Path):
    df = pd.read_parquet(cli_run / "results.parquet")
    assert len(df) == 4 and set(df["mask"]) == {"object"} and set(df["dataset"]) == {"imagenet_seg"}
    assert df[list(SEGMENTATION_METRICS) + list(SEGMENTATION_COUNTS)].notna().all().all()
    assert df[[f"{m}_pert" for m in SEGMENTATION_METRICS]].isna().all().all()
    assert ((df["pixel_accuracy"] >= 0) & (df["pixel_accuracy"] <= 1)).all()
    assert (df["seg_labeled"] == 224 * 224).all()


@pytest.mark.slow
def test_entrypoint_summary_pools(cli_run: Path):
    df = pd.read_parquet(cli_run / "results.parquet")
    summary = json.loads((cli_run / "summary.json").read_text())
    want = pooled_segmentation(df)
    assert summary["means"]["miou"] == pytest.approx(want["miou"], rel=1e-12)
    assert summary["means"]["pixel_accuracy"] == pytest.approx(want["pixel_accuracy"], rel=1e-12)
    assert summary["means"]["mean_ap"] == pytest.approx(df["mean_ap"].mean(), rel=1e-12)
    loc = summary["localisation"]
    assert loc["seg_threshold"] == "mean" and "/value/id" in loc["labels"] and "sum(seg_correct)" in loc["seg_pooling"]
