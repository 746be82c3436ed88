"""Localisation study: RIVAL10 mask selection, the no-mask error, rows against direct computation."""
from __future__ import annotations

import base64
import io
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from clip_xai.__main__ import run
from clip_xai.data import Rival10Dataset, SampleDataset, collate
from clip_xai.errors import ClipXaiError
from clip_xai.explainers.postprocess import image_maps
from clip_xai.metrics.localisation import METRICS, pooled_segmentation, segmentation_scores
from clip_xai.schema import LOCALISATION_COLUMNS, RUN_COLUMNS, SEGMENTATION_COUNTS, SEGMENTATION_METRICS
from clip_xai.studies.localisation import LocalisationStudy, datasets_with_masks
from tests.helpers import compose_cfg, run_cli

W, H = 80, 60  # fixture image size (landscape: the 224 crop keeps the middle 60x60 region)


def _png_b64(mask: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _box(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[r0:r1, c0:c1] = True
    return m


@pytest.fixture
def rival10(tmp_path: Path) -> Path:
    """A synthetic RIVAL10 test split: 3 images with pickled masks (no real RIVAL10 files)."""
    folder = tmp_path / "RIVAL10" / "test" / "ordinary"
    folder.mkdir(parents=True)
    entries = {
        "n02123394_1": {"entire-object": _box(10, 50, 20, 50), "ears": _box(10, 20, 20, 30)},  # cat
        "n03796401_2": {"entire-object": _box(0, 60, 40, 80)},  # truck: no ears
        "n01531178_3": {"entire-object": _box(20, 40, 30, 60), "wings": _box(20, 30, 30, 40)},  # bird
    }
    for i, (stem, masks) in enumerate(entries.items()):
        arr = np.random.default_rng(i).integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{stem}.JPEG")
        with (folder / f"{stem}_attr_dict.pkl").open("wb") as f:
            pickle.dump({k: _png_b64(v) for k, v in masks.items()}, f)
        union = np.any([np.zeros((H, W), bool), *(v for k, v in masks.items() if k != "entire-object")], axis=0)
        Image.fromarray(union.astype(np.uint8) * 255).save(folder / f"{stem}_merged_mask.JPEG")
    return tmp_path


def _mask(ds: Rival10Dataset, sid: str) -> torch.Tensor:
    return ds[ds.sample_ids.index(sid)]["object_mask"]


def test_mask_selection(rival10: Path):
    obj = Rival10Dataset(rival10, mask="entire_object")
    ears = Rival10Dataset(rival10, mask="ears")
    merged = Rival10Dataset(rival10, mask="merged", mask_threshold=127)  # JPEG halo above 0
    # 80x60 -> shorter side 224: scale 224/60, crop columns [37.3, 261.3) of 298.7
    cat = _mask(obj, "n02123394_1")
    assert cat.shape == (224, 224) and cat.dtype == torch.bool
    assert cat[100, 100] and not cat[2, 100] and not cat[100, 220]
    assert _mask(ears, "n02123394_1").sum() < cat.sum() and _mask(ears, "n02123394_1")[50, 50]
    assert not _mask(ears, "n03796401_2").any()  # attribute absent: an empty mask, flagged later
    wings = _mask(Rival10Dataset(rival10, mask="wings"), "n01531178_3")
    assert wings.any() and (_mask(merged, "n01531178_3") ^ wings).float().mean() < 0.01  # the JPEG is lossy
    assert Rival10Dataset(rival10, mask="colored_eyes").mask == "colored-eyes"  # _ for -
    assert torch.equal(_mask(Rival10Dataset(rival10), "n02123394_1"), cat)  # auto = entire-object here
    with pytest.raises(ClipXaiError, match="unknown RIVAL10 mask"):
        Rival10Dataset(rival10, mask="whiskers")


def test_dataset_without_masks_fails_at_start(tmp_path: Path):
    assert datasets_with_masks() == ["imagenet_seg", "rival10"]
    with pytest.raises(ClipXaiError, match="dataset=rival10") as err:
        LocalisationStudy().check_data(SampleDataset(limit=2))
    assert "SampleDataset" in str(err.value)


def _run(rival10: Path, out: Path, *overrides: str) -> pd.DataFrame:
    cfg = compose_cfg(["model=tiny", "study=localisation", "dataset=rival10", f"dataset.root={rival10}",
                       "logger=none", f"output_root={out}", "device=cpu", *overrides])
    run(cfg, out / "run", None, "test")
    return pd.read_parquet(out / "run" / "results.parquet")


def test_rows_match_direct_computation(rival10: Path, tmp_path: Path, tiny):
    df = _run(rival10, tmp_path, "explainer=gradcam", "study.perturbed=true", "perturbation.eps=0.0314",
              "metrics.mask=ears")
    assert list(df.columns) == LOCALISATION_COLUMNS + RUN_COLUMNS and len(df) == 3
    assert set(df["mask"]) == {"ears"} and set(df["eps"]) == {0.0314}
    no_ears = df.set_index("sample_id").loc[["n03796401_2", "n01531178_3"]]  # truck, bird
    assert (no_ears["map_flag"] == "empty_mask").all() and no_ears["pointing_game"].isna().all()
    assert (no_ears["mask_area"] == 0).all()
    ok = df[df["map_flag"] == ""]
    assert len(ok) == 1 and ok[[*METRICS, *(f"{m}_pert" for m in METRICS)]].notna().all().all()
    assert df[["sparseness", "complexity", "sparseness_pert", "complexity_pert"]].notna().all().all()
    # the clean columns equal the metrics of the map computed directly
    from clip_xai.explainers.gradcam import GradCAM
    from clip_xai.metrics.localisation import LocalisationMetrics

    ds = Rival10Dataset(rival10, mask="ears")
    batch, _, _ = collate([ds[i] for i in range(len(ds))])
    maps = image_maps(GradCAM()(tiny, batch.pixels, tiny.tokenize(batch.captions), torch.zeros(3, dtype=torch.long)), (224, 224))
    want = LocalisationMetrics()(maps, batch.object_masks)
    got = df.set_index("sample_id").loc[batch.sample_ids]
    for name in METRICS:
        np.testing.assert_allclose(got[name].to_numpy(), want[name].numpy(), rtol=1e-6, equal_nan=True)
    seg = segmentation_scores(maps, batch.object_masks)  # defined for the empty masks too, as the reference counts them
    for name in (*SEGMENTATION_METRICS, *SEGMENTATION_COUNTS):
        np.testing.assert_allclose(got[name].to_numpy(), seg[name].numpy(), rtol=1e-6)
        assert got[f"{name}_pert"].notna().all()
    summary = pd.read_json(tmp_path / "run" / "summary.json", typ="series")
    assert summary["counts"]["flags"] == {"empty_mask": 2}
    assert summary["means"]["miou"] == pytest.approx(pooled_segmentation(df)["miou"], rel=1e-12)  # pooled, not the row mean
    assert summary["means"]["miou_pert"] == pytest.approx(pooled_segmentation(df, "pert")["miou_pert"], rel=1e-12)


@pytest.mark.slow
def test_cli_localisation_and_bad_dataset(rival10: Path, tmp_path: Path):
    res = run_cli(["model=tiny", "study=localisation", "dataset=sample", "logger=none", f"output_root={tmp_path}"])
    assert res.returncode == 2 and "dataset=rival10" in res.stderr and "Traceback" not in res.stderr
    assert not list(tmp_path.rglob("results.parquet"))
    res = run_cli(["model=tiny", "study=localisation", "dataset=rival10", f"dataset.root={rival10}", "explainer=saliency",
                   "logger=none", f"output_root={tmp_path}", "name=loc"])
    assert res.returncode == 0, res.stderr[-3000:]
    (path,) = list((tmp_path / "loc").rglob("results.parquet"))
    df = pd.read_parquet(path)
    assert len(df) == 3 and df["pointing_game"].notna().all() and df["pointing_game_pert"].isna().all()
    assert df[["pixel_accuracy", "miou", "mean_ap"]].notna().all().all() and df["miou_pert"].isna().all()
    assert set(df["perturbation"]) == {"none"}
