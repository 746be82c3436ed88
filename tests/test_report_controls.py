"""The report's controls view: adversarial excess against hand computations, achieved table, figures."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

from clip_xai.report import controls, stats

N = 30


def frame() -> pd.DataFrame:
    """Two methods × one ε × {fgsm, pgd} attacks and a noise control on the same 30 samples."""
    rng = np.random.default_rng(0)
    parts = []
    for method, shift in (("gradcam", 0.3), ("selfattn", 0.0)):
        base = rng.uniform(0.5, 0.9, N)
        for pert, target, delta in (("fgsm", "clip_xai.perturbations.fgsm.FGSM", shift),
                                    ("pgd", "clip_xai.perturbations.pgd.PGD", shift + 0.1),
                                    ("noise_sign", controls.CONTROL_TARGET, 0.0)):
            parts.append(pd.DataFrame({
                "dataset": "d", "model": "m", "method": method, "eps": 0.03, "perturbation": pert,
                "cfg.perturbation._target_": target, "sample_id": [f"s{i}" for i in range(N)],
                "spearman": base - delta + rng.normal(0, 0.05, N), "ssim": np.nan, "topk": base,
                "linf": 0.03, "sim_diff": 0.1, "clamped": 0.0, "objective": np.nan}))
    return pd.concat(parts, ignore_index=True)


def test_excess_matches_paired_hand_computation():
    df = frame()
    table = controls.excess_table(df, n_boot=200, seed=0)
    assert set(table["metric"]) == {"spearman", "topk"}  # ssim is all NaN
    assert set(zip(table["attack"], table["control"])) == {("fgsm", "noise_sign"), ("pgd", "noise_sign")}
    for _, r in table.iterrows():
        g = df[(df.method == r.method)].set_index(["perturbation", "sample_id"])[r.metric]
        diff = (g["noise_sign"] - g[r.attack]).to_numpy()
        assert r.n == N
        assert np.isclose(r.excess, diff.mean())
        assert r.lo <= r.excess <= r.hi
        want_p = 1.0 if (diff == 0).all() else wilcoxon(diff).pvalue
        assert np.isclose(r.p, want_p)
    sp = table[table.metric == "spearman"]
    assert np.allclose(sp["p_holm"], stats.holm(sp["p"]))  # one family: setting × metric × ε
    gradcam = sp[sp.method == "gradcam"].set_index("attack")
    assert gradcam.loc["pgd", "excess"] > gradcam.loc["fgsm", "excess"] > 0.2 and gradcam["significant"].all()
    assert (table[table.metric == "topk"]["excess"] == 0).all()


def test_controls_view_writes_files_and_says_what_it_skipped(tmp_path):
    df = frame()
    figs, tabs, skipped = controls.controls_view(df, tmp_path, n_boot=50)
    assert not skipped and len(figs) == 1 and len(tabs) == 2
    for _, paths, _ in figs + tabs:
        assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    achieved = pd.read_csv(tmp_path / "tables" / "perturbation_achieved.csv")
    assert set(achieved["perturbation"]) == {"fgsm", "pgd", "noise_sign"} and (achieved["rows"] == 2 * N).all()
    figs, tabs, skipped = controls.controls_view(df[df.perturbation != "noise_sign"], tmp_path / "b", n_boot=50)
    assert not figs and len(tabs) == 1 and "perturbation=noise" in skipped[0]


def test_control_target_names_the_noise_class():
    from clip_xai.perturbations.noise import Noise

    assert controls.CONTROL_TARGET == f"{Noise.__module__}.{Noise.__qualname__}"


def test_explanation_shift_table_pairs_rows_and_rates():
    df = frame()
    att = df.perturbation == "fgsm"
    df["target_mass"] = np.where(att, 0.2, np.nan)
    df["target_mass_pert"] = np.where(att, 0.5, np.nan)
    df["pred_kept"] = np.where(att, (np.arange(len(df)) % 2).astype(float), np.nan)
    df["mask_flag"], df["mask_flag_pert"], df["sim_change"] = 0.0, np.where(att, 1.0, 0.0), 0.004
    assert controls.has_shift_columns(df) and not controls.has_shift_columns(frame())
    t = controls.shift_table(df).set_index(["method", "perturbation"])
    row = t.loc[("gradcam", "fgsm")]
    assert row["rows"] == N and np.isclose(row["target_shift"], 0.3) and np.isclose(row["kept_rate"], 0.5)
    assert row["flag_rate_pert"] == 1.0 and row["flag_rate_clean"] == 0.0 and np.isclose(row["mean_abs_ds"], 0.004)
    assert np.isnan(t.loc[("gradcam", "noise_sign"), "target_shift"])
