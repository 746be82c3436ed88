"""The new model configs through the real entrypoint: a random hf_clip run, and the start-up
requirement error for a method that needs a class token on a ResNet CLIP."""
from __future__ import annotations

import pandas as pd
import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.slow


def test_hf_clip_random_model_runs_end_to_end(tmp_path):
    res = run_cli(["model=hf_clip", "model.pretrained=false", "model.name=hf_clip_random", "explainer=game",
                   "dataset.limit=2", "logger=none", f"output_root={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    (parquet,) = list(tmp_path.rglob("results.parquet"))
    df = pd.read_parquet(parquet)
    assert len(df) == 2 and df["model"].eq("hf_clip_random").all() and df["spearman"].notna().all()


def test_method_needing_a_class_token_fails_at_start_up_on_resnet(tmp_path):
    res = run_cli(["model=open_clip", "model.arch=RN50", "explainer=game", "dataset.limit=2", "logger=none",
                   f"output_root={tmp_path}"])
    assert res.returncode == 2, res.stderr[-3000:]
    err = res.stderr
    assert "explainer game (image maps) cannot run on model RN50-None" in err
    assert "lacks attention" in err and "pooled_token" in err and "ModifiedResNet" in err and "fix:" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("results.parquet"))
