"""The perturbation group through the real entrypoint: rows, W&B columns, the report's controls view, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from clip_xai.report.index import make_report
from tests.helpers import run_cli

pytestmark = pytest.mark.slow
EPS = 0.0314


def rows(root: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in root.rglob("results.parquet") if "report" not in p.parts],
                     ignore_index=True)


def test_attacks_and_controls_run_log_and_report(tmp_path):
    common = ["model=tiny", "dataset.limit=2", "explainer=gradcam", f"perturbation.eps={EPS}", "name=ctl",
              f"output_root={tmp_path}"]
    res = run_cli(["-m", "perturbation=fgsm,pgd,noise", "logger=wandb", *common])
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli(["-m", "perturbation=map_attack", "perturbation.steps=2", "logger=none", *common])
    assert res.returncode == 0, res.stderr[-3000:]
    df = rows(tmp_path / "ctl")
    assert sorted(df["perturbation"].unique()) == ["fgsm", "map_attack", "noise_sign", "pgd"]
    assert (df["linf"] <= df["eps"] + 1e-6).all() and (df.loc[df.perturbation != "map_attack", "linf"] > 0.99 * EPS).all()
    assert df["clamped"].between(0, 1).all()
    attack = df[df.perturbation == "map_attack"]
    assert ((attack["sim_pert"] - attack["sim_orig"]).abs() <= 0.01 + 1e-5).all() and attack["objective"].notna().all()
    assert df.loc[df.perturbation != "map_attack", "objective"].isna().all()
    params = {p: json.loads(s) for p, s in zip(df["perturbation"], df["perturbation_params"])}
    assert params["pgd"]["steps"] == 10 and params["map_attack"]["steps"] == 2 and params["fgsm"]["space"] == "pixel"
    # W&B: the per-sample table carries the new columns, the summary their means
    for wb in (tmp_path / "ctl").rglob("offline-run-*"):
        (table,) = (wb / "files" / "media" / "table").glob("samples_*.table.json")
        columns = json.loads(table.read_text())["columns"]
        assert {"linf", "clamped", "objective", "perturbation_params"} <= set(columns)
        assert b"mean/linf" in next(wb.glob("run-*.wandb")).read_bytes()
    report = make_report([tmp_path / "ctl"], n_boot=50)
    assert (report.out_dir / "figures" / "controls_vs_eps.png").is_file()
    excess = pd.read_csv(report.out_dir / "tables" / "adversarial_excess.csv")
    assert set(excess["attack"]) == {"fgsm", "pgd", "map_attack"} and set(excess["control"]) == {"noise_sign"}
    assert "Adversarial excess" in report.index.read_text()


def test_map_attack_on_an_explainer_without_differentiable_maps_is_one_clear_error(tmp_path):
    res = run_cli(["model=tiny", "dataset.limit=1", "explainer=rise", "perturbation=map_attack", "logger=none",
                   f"output_root={tmp_path}"])
    assert res.returncode == 2
    assert "explainer rise has none" in res.stderr and "perturbation.surrogate=gradcam" in res.stderr
    assert "Traceback" not in res.stderr and not list(tmp_path.rglob("results.parquet"))
