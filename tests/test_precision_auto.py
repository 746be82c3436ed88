"""precision=auto: the per-method table the bench writes, its choice rule, and the precision in every row."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from clip_xai.perf import precision_table
from clip_xai.config import precision_scope, resolve_precision
from clip_xai.errors import ClipXaiError
from tests.helpers import run_cli

CPU = torch.device("cpu")


def _agreement(rows):
    return pd.DataFrame([{"explainer": e, "precision": p, "samples": 4, "mean_spearman": m, "min_spearman": m - 0.01,
                          "nan_pairs": n} for e, p, m, n in rows])


def test_cheapest_precision_at_or_above_the_threshold():
    table = precision_table.choose(_agreement([
        ("rise", "tf32", 0.9999, 0), ("rise", "bf16", 0.9998, 0), ("rise", "fp8", 0.995, 0),
        ("gradcam", "tf32", 0.999, 0), ("gradcam", "bf16", 0.983, 0),  # bf16 below 0.99: tf32
        ("abm", "bf16", 0.954, 0), ("abm", "tf32", 0.97, 0),  # none reaches 0.99: strict fp32
        ("eclip", "bf16", 0.995, 1),  # a NaN pair disqualifies
    ]))
    assert dict(zip(table.explainer, table.precision)) == {"rise": "fp8", "gradcam": "tf32", "abm": "fp32",
                                                           "eclip": "fp32"}


def test_auto_reads_the_table_of_this_model_and_device(tmp_path):
    assert resolve_precision(CPU, "auto", method="gradcam", model="tiny", table_dir=tmp_path) == "fp32"  # no table
    path = precision_table.write(tmp_path, "tiny", CPU, _agreement([("gradcam", "bf16", 0.995, 0),
                                                                   ("abm", "bf16", 0.95, 0)]))
    assert path == tmp_path / "tiny__cpu.csv"
    assert resolve_precision(CPU, "auto", method="gradcam", model="tiny", table_dir=tmp_path) == "bf16"
    assert resolve_precision(CPU, "auto", method="abm", model="tiny", table_dir=tmp_path) == "fp32"
    assert resolve_precision(CPU, "auto", method="rise", model="tiny", table_dir=tmp_path) == "fp32"  # not in it
    assert resolve_precision(CPU, "auto", method="gradcam", model="vit_b16", table_dir=tmp_path) == "fp32"
    with pytest.raises(ClipXaiError, match="needs the method"):
        resolve_precision(CPU, "auto")
    with pytest.raises(ClipXaiError, match="resolved per method"):
        with precision_scope(CPU, "auto"):
            pass


def test_entrypoint_records_the_precision_used_in_every_row(tmp_path):
    precision_table.write(tmp_path / "precision", "tiny", CPU, _agreement([("gradcam", "bf16", 0.995, 0)]))
    res = run_cli(["-m", "model=tiny", "explainer=gradcam,selfattn", "precision=auto", "dataset.limit=2",
                   "logger=none", "device=cpu", "name=auto", f"output_root={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    got = {}
    for results in Path(tmp_path / "auto").glob("*/results.parquet"):
        df = pd.read_parquet(results)
        assert df.precision.nunique() == 1 and len(df) == 2
        got[df.explainer.iloc[0]] = df.precision.iloc[0]
        assert f"precision: {df.precision.iloc[0]}" in (results.parent / "config.yaml").read_text()
    assert got == {"gradcam": "bf16", "selfattn": "fp32"}
