"""The complexity columns in the sensitivity and faithfulness rows (real study loop, tiny model)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from clip_xai.__main__ import run
from clip_xai.metrics.complexity import complexity, sparseness
from tests.helpers import compose_cfg


def _run(tmp_path, *overrides: str) -> pd.DataFrame:
    cfg = compose_cfg(["model=tiny", "dataset=sample", "dataset.limit=2", "logger=none", "device=cpu", "cache=false",
                       f"output_root={tmp_path}", *overrides])
    run(cfg, tmp_path / "run", None, "test")
    return pd.read_parquet(tmp_path / "run" / "results.parquet")


def test_sensitivity_rows_carry_complexity_of_both_maps(tmp_path):
    df = _run(tmp_path, "explainer=selfattn", "save_examples=2")
    cols = ["sparseness", "complexity", "sparseness_pert", "complexity_pert"]
    assert df[cols].notna().all().all()
    assert ((df["sparseness"] >= 0) & (df["sparseness"] < 1)).all()
    assert (df["complexity"] <= math.log(224 * 224)).all()
    ex = np.load(tmp_path / "run" / "examples.npz")  # float16 copies of the same maps
    maps = torch.from_numpy(ex["map_clean"].astype(np.float32))
    np.testing.assert_allclose(df["sparseness"], sparseness(maps).numpy(), atol=2e-3)
    np.testing.assert_allclose(df["complexity"], complexity(maps).numpy(), atol=2e-2)


def test_faithfulness_rows_carry_image_and_text_complexity(tmp_path):
    df = _run(tmp_path, "study=faithfulness", "explainer=selfattn", "metrics.road=false")
    assert df[["sparseness_image", "complexity_image", "sparseness_text", "complexity_text"]].notna().all().all()
    # text maps: entropy over the caption tokens only ("a photo of a cat" etc.: at most 10 tokens)
    assert (df["complexity_text"] <= math.log(10)).all()
