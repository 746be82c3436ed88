"""Every config option composes and builds; bad input gives one clear error before any work."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from clip_xai.__main__ import run
from clip_xai.paths import CONF_DIR
from clip_xai.config import build
from clip_xai.errors import ClipXaiError
from tests.helpers import compose_cfg

GROUPS = ["model", "dataset", "explainer", "perturbation", "metrics", "study", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group):
    for option in options(group):
        overrides = [f"{group}={option}"]
        if group == "metrics" and option == "faithfulness" or group == "study" and option == "faithfulness":
            overrides = ["study=faithfulness", "metrics=faithfulness"]
        cfg = compose_cfg(overrides)
        generic = group == "model" and option in ("open_clip", "hf_clip")  # named after arch / repo
        assert cfg[group].name == option or group in ("metrics", "study") or generic


@pytest.mark.parametrize("explainer", options("explainer"))
def test_every_explainer_builds(explainer):
    cfg = compose_cfg([f"explainer={explainer}", "model=tiny"])
    obj = build(cfg, "explainer")
    assert obj.name == explainer and obj.modality == "image"


def test_experiments_compose():
    for exp in sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")):
        cfg = compose_cfg([f"experiment={exp}"])
        assert OmegaConf.select(cfg, "model.name")


def _run(tmp_path, overrides):
    cfg = compose_cfg(["model=tiny", "logger=none", f"output_root={tmp_path}", *overrides])
    return run(cfg, tmp_path / "run", None, "test")


def test_eps_out_of_range(tmp_path):
    for eps in ("-0.1", "1.5"):
        with pytest.raises(ClipXaiError, match=r"eps=.*outside \[0, 1\]"):
            _run(tmp_path, [f"perturbation.eps={eps}"])


def test_missing_dataset_root(tmp_path):
    with pytest.raises(ClipXaiError, match="dataset.root"):
        _run(tmp_path, ["dataset=rival10"])
    with pytest.raises(ClipXaiError, match="not found"):
        _run(tmp_path, ["dataset=rival10", f"dataset.root={tmp_path}/nowhere"])


def test_modality_not_supported(tmp_path):
    with pytest.raises(ClipXaiError, match="has no text maps"):
        _run(tmp_path, ["explainer=gradcam", "explainer.modality=text"])


def test_text_modality_in_sensitivity_study(tmp_path):
    with pytest.raises(ClipXaiError, match="study=faithfulness"):
        _run(tmp_path, ["explainer=selfattn", "explainer.modality=text", "dataset.limit=1"])


def test_corrupt_image_error_and_skip(tmp_path):
    root = tmp_path / "cc"
    root.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 30, 30)).save(root / "good.jpg")
    (root / "bad.jpg").write_bytes(b"not a jpeg at all")
    (root / "list.csv").write_text("image_path,caption\ngood.jpg,a red square\nbad.jpg,a broken file\n")
    with pytest.raises(ClipXaiError, match="bad.jpg"):
        _run(tmp_path, ["dataset=cc", f"dataset.root={root}/list.csv", "dataset.on_bad_image=error"])
    summary = _run(tmp_path / "skip", ["dataset=cc", f"dataset.root={root}/list.csv", "explainer=selfattn"])
    assert summary["counts"]["bad_images"] == 1 and summary["counts"]["rows"] == 2


def test_precision_checks_and_scope_restores_flags():
    import torch

    from clip_xai.config import check_precision, precision_scope

    cpu = torch.device("cpu")
    for bad, msg in (("fp4", "not known"), ("fp8", "FP8 tensor cores"), ("tf32", "needs a CUDA"), ("fp16", "needs a CUDA")):
        with pytest.raises(ClipXaiError, match=msg):
            check_precision(cpu, bad)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with precision_scope(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with precision_scope(cpu, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags


def test_clean_map_cache_key_separates_what_changes_a_map():
    from clip_xai.studies.cache import cache_key

    base = compose_cfg(["model=tiny", "explainer=rise"])
    key = cache_key(base, "cpu")
    assert key == cache_key(compose_cfg(["model=tiny", "explainer=rise", "dataset.limit=3"]), "cpu")
    assert key != cache_key(base, "cuda")  # RISE masks come from per-device generators
    for override in ("precision=bf16", "seed=1", "explainer.n_masks=10"):
        assert key != cache_key(compose_cfg(["model=tiny", "explainer=rise", override]), "cpu"), override


def test_run_dirname_stays_a_legal_unique_name():
    """Hydra's override_dirname as the folder name; a long one (a class list in the overrides) is cut
    to RUN_DIRNAME_BYTES bytes and ends in a hash of the whole, so two long names that share their
    start stay apart and a rerun finds the same folder."""
    import hashlib

    from clip_xai.config import RUN_DIRNAME_BYTES, run_dirname

    assert run_dirname("") == "defaults"
    assert run_dirname("dataset.root=/data/x,explainer=gradcam") == "dataset.root=_data_x,explainer=gradcam"
    classes = ",".join(["cat", "dog", "bird", "car", "boat", "plane", "tree", "house", "person", "flower"] * 5)
    a, b = f"study.classes=[{classes}],study.mode=deletion", f"study.classes=[{classes}],study.mode=insertion"
    na, nb = run_dirname(a), run_dirname(b)
    assert len(na.encode()) <= RUN_DIRNAME_BYTES and len(nb.encode()) <= RUN_DIRNAME_BYTES
    assert len(a.encode()) > RUN_DIRNAME_BYTES and na != nb and na == run_dirname(a)
    assert na.endswith("--" + hashlib.sha1(a.encode()).hexdigest()[:12]) and a.startswith(na[: -14])
    assert run_dirname("x" * RUN_DIRNAME_BYTES) == "x" * RUN_DIRNAME_BYTES  # at the bound: kept whole
    wide = "é" * RUN_DIRNAME_BYTES  # 2 bytes a character: the cut never splits one
    assert len(run_dirname(wide).encode()) <= RUN_DIRNAME_BYTES and run_dirname(wide).split("--")[0].strip("é") == ""
