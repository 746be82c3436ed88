"""Report sections of the localisation and randomisation studies, on synthetic runs with known means."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clip_xai.report.index import make_report
from clip_xai.schema import LOCALISATION_COLUMNS, LOCALISATION_METRICS, RANDOMISATION_COLUMNS
from tests.test_report import write_run

N = 20
L = 4  # blocks


def ident(expl: str, study: str) -> dict:
    return {"sample_id": [f"s{i:02d}" for i in range(N)], "caption": "a photo", "label": 0, "dataset": "rival10",
            "model": "tiny", "explainer": expl, "modality": "image", "study": study, "seed": 0, "caption_flag": ""}


def loc_rows(expl: str, eps: float, rng) -> pd.DataFrame:
    base = {"gradcam": 0.8, "rise": 0.4}[expl]
    cols = {m: np.clip(rng.normal(base, 0.05, N), 0, 1) for m in LOCALISATION_METRICS}
    cols |= {f"{m}_pert": cols[m] - 0.1 for m in LOCALISATION_METRICS}
    df = pd.DataFrame({**ident(expl, "localisation"), "mask": "entire_object", "mask_area": 0.25,
                       "perturbation": "fgsm", "eps": eps, **cols, "sparseness": 0.5, "complexity": 9.0,
                       "sparseness_pert": 0.4, "complexity_pert": 9.5, "map_flag": ""})
    return df.reindex(columns=LOCALISATION_COLUMNS)  # the segmentation counts are absent: NaN


def rand_rows(expl: str, rng) -> pd.DataFrame:
    slope = {"saliency": 0.25, "selfattn": 0.0}[expl]  # selfattn "fails": its map ignores the weights
    parts = [("none", -1, 0, 1.0)]
    parts += [("cascading", L - k, k, 1 - slope * k) for k in range(1, L + 1)]
    parts += [("independent", b, 1, 1 - slope) for b in range(L - 1, -1, -1)]
    frames = []
    for mode, block, n, mu in parts:
        v = np.clip(mu + rng.normal(0, 0.01, N), -1, 1) if n else np.ones(N)
        frames.append(pd.DataFrame({**ident(expl, "randomisation"), "tower": "vision", "randomisation": mode,
                                    "block": block, "unit": f"b{block}" if n else "none", "n_randomised": n, "sim_orig": 0.3, "sim_rand": 0.2,
                                    "rand_spearman": v, "rand_ssim": v, "rand_topk": v, "sparseness": 0.5,
                                    "complexity": 9.0, "sparseness_rand": 0.5, "complexity_rand": 9.0, "map_flag": ""}))
    return pd.concat(frames, ignore_index=True)[RANDOMISATION_COLUMNS]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("sanity")
    rng = np.random.default_rng(0)
    job, frames = 0, {}
    for expl in ["gradcam", "rise"]:
        for eps in [0.01, 0.03]:
            df = loc_rows(expl, eps, rng)
            if eps == 0.03:  # the clean columns repeat across ε jobs (cached clean map)
                df[LOCALISATION_METRICS] = frames[expl][LOCALISATION_METRICS].to_numpy()
            frames.setdefault(expl, df)
            write_run(root / "loc" / str(job), {"study": {"name": "localisation"}, "explainer": {"name": expl},
                                                "perturbation": {"name": "fgsm", "eps": eps}}, df)
            job += 1
    for expl in ["saliency", "selfattn"]:
        write_run(root / "rnd" / expl, {"study": {"name": "randomisation"}, "explainer": {"name": expl}},
                  rand_rows(expl, rng))
    make_report([root], n_boot=50, seed=0)
    return root / "report", frames


def test_localisation_table(report):
    out, frames = report
    tab = pd.read_csv(out / "tables" / "localisation.csv")
    clean = tab[tab["condition"] == "clean"]
    for expl, df in frames.items():
        for m in LOCALISATION_METRICS:
            row = clean[(clean["method"] == expl) & (clean["metric"] == m)].iloc[0]
            assert row["n"] == N  # clean rows counted once, not once per ε job
            assert row["mean"] == pytest.approx(df[m].mean()) and row["lo"] <= row["mean"] <= row["hi"]
    pert = tab[(tab["condition"] == "fgsm") & (tab["metric"] == "pointing_game")]
    assert sorted(pert["eps"].unique()) == [0.01, 0.03] and len(pert) == 4
    md = (out / "tables" / "localisation.md").read_text()
    assert "Pointing game ↑" in md and "[" in md and "0.250" in md  # CIs and the uniform-map baseline
    assert (out / "figures" / "localisation_vs_eps.png").is_file()


def test_randomisation_figure_and_table(report):
    out, _ = report
    assert (out / "figures" / "randomisation.png").is_file() and (out / "figures" / "randomisation.pdf").is_file()
    tab = pd.read_csv(out / "tables" / "randomisation.csv")
    sp = tab[(tab["metric"] == "rand_spearman") & (tab["mode"] == "cascading")]
    sal = sp[sp["method"] == "saliency"].sort_values("x")
    assert sal["state"].tolist() == ["none", "b3", "b2", "b1", "b0"]
    assert sal["mean"].iloc[0] == 1.0 and sal["mean"].iloc[-1] == pytest.approx(0.0, abs=0.01)
    flat = sp[sp["method"] == "selfattn"]
    assert flat["mean"].min() == pytest.approx(1.0, abs=0.01)
    md = (out / "tables" / "randomisation.md").read_text()
    assert "none" in md and "b0" in md
    index = (out / "index.md").read_text()
    assert "Model randomisation" in index and "Localisation" in index
    tests = pd.read_csv(out / "tables" / "wilcoxon.csv")
    rnd = tests[(tests["study"] == "randomisation") & (tests["metric"] == "rand_spearman")]
    # one test per randomised state (never paired across states): none + 4 cascading + 4 independent
    assert len(rnd) == 9 and (rnd["n"] == N).all()
    assert rnd.groupby(["randomisation", "unit"]).size().eq(1).all()


def _loc(expl: str, mask: str, mu: float, rng) -> pd.DataFrame:
    df = loc_rows(expl, 0.01, rng).assign(mask=mask)
    df[LOCALISATION_METRICS] = np.clip(rng.normal(mu, 0.05, (N, len(LOCALISATION_METRICS))), 0, 1)
    return df


def _rnd(expl: str, tower: str, rng) -> pd.DataFrame:
    return rand_rows(expl, rng).assign(tower=tower, modality="image" if tower == "vision" else "text")


def test_two_masks_and_two_towers_are_never_pooled(tmp_path):
    """Localisation on two masks and randomisation of two towers in one report: every paired test
    and rank is within one mask / one tower, with every sample of it; a pooled test would show n=2N.
    The methods' order flips between the masks, so a pooled test would also blur the winner."""
    rng = np.random.default_rng(1)
    job = 0
    for mask, mus in [("entire_object", {"gradcam": 0.8, "rise": 0.4}), ("wings", {"gradcam": 0.3, "rise": 0.7})]:
        for expl, mu in mus.items():
            write_run(tmp_path / "runs" / f"loc{job}", {"study": {"name": "localisation"}, "explainer": {"name": expl},
                                                       "metrics": {"mask": mask}}, _loc(expl, mask, mu, rng))
            job += 1
    for tower in ["vision", "text"]:
        for expl in ["saliency", "selfattn"]:
            write_run(tmp_path / "runs" / f"rnd{job}", {"study": {"name": "randomisation"},
                                                       "explainer": {"name": expl}}, _rnd(expl, tower, rng))
            job += 1
    make_report([tmp_path / "runs"], out=tmp_path / "report", n_boot=20, seed=0)
    tests = pd.read_csv(tmp_path / "report" / "tables" / "wilcoxon.csv")
    loc = tests[(tests["study"] == "localisation") & (tests["metric"] == "pointing_game")].set_index("mask")
    assert sorted(loc.index) == ["entire_object", "wings"] and (loc["n"] == N).all()
    assert loc.loc["entire_object", "better"] == "gradcam" and loc.loc["wings", "better"] == "rise"
    rnd = tests[(tests["study"] == "randomisation") & (tests["metric"] == "rand_spearman")]
    assert set(rnd["tower"]) == {"vision", "text"} and (rnd["n"] == N).all()
    assert len(rnd) == 2 * 9  # two towers x (none + 4 cascading + 4 independent states)
    ranks = pd.read_csv(tmp_path / "report" / "tables" / "ranks.csv")
    assert (ranks["n_samples"] == N).all() and {"mask", "tower"} <= set(ranks.columns)
    md = (tmp_path / "report" / "tables" / "wilcoxon.md").read_text()
    assert "mask=wings" in md and "tower=text" in md
