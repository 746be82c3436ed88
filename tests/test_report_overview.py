"""The overview (report/overview.py) on a hand-made frame: headline choice per study, ranks with
ties, a study with one method, studies on different samples, intervals, random-weight labels."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from clip_xai.report import overview, stats
from clip_xai.report.controls import CONTROL_TARGET

S = [f"s{i}" for i in range(4)]  # the samples of sensitivity, faithfulness, localisation
T = ["t0", "t1", "t2"]  # randomisation ran on other samples
OFFSET = np.array([-0.03, -0.01, 0.01, 0.03])  # per-sample spread with mean exactly 0
N_BOOT = 300


def rows(study: str, method: str, samples: list[str], **cols) -> pd.DataFrame:
    """Rows of one method; scalar columns broadcast, array columns per sample."""
    base = {"study": study, "method": method, "explainer": method, "dataset": "d", "model": "m",
            "sample_id": samples, "cfg.model.pretrained": "openai"}
    return pd.DataFrame({**base, **cols})


def frame() -> pd.DataFrame:
    parts = []
    sens = {"A": 0.9, "B": 0.5, "C": 0.5}  # at the middle ε; B and C tie
    for m, v in sens.items():
        for eps in (0.01, 0.03, 0.1):
            val = v if eps == 0.03 else 1 - v  # the other ε order the methods the other way round
            parts.append(rows("sensitivity", m, S, perturbation="fgsm", eps=eps, spearman=val + OFFSET,
                              sparseness={"A": 0.2, "B": 0.3, "C": 0.4}[m], mask_flag=np.nan,
                              **{"cfg.perturbation._target_": "clip_xai.perturbations.fgsm.FGSM"}))
        parts.append(rows("sensitivity", m, S, perturbation="noise_sign", eps=0.03, spearman=0.0, sparseness=0.9,
                          mask_flag=np.nan, **{"cfg.perturbation._target_": CONTROL_TARGET}))  # a control: never a headline
    parts.append(rows("faithfulness", "A", S, conf_drop_image=5.0 + OFFSET, sparseness_image=0.5))  # one method
    for m, (miou, pg) in {"A": (0.1, 0.9), "B": (0.6, 0.1), "C": (0.3, 0.5)}.items():
        parts.append(rows("localisation", m, S, mask="entire_object", eps=np.nan, perturbation=np.nan,
                          miou=miou + OFFSET, pointing_game=pg))
    for m, v in {"A": 0.2, "B": 0.8, "C": 0.5}.items():
        parts.append(rows("randomisation", m, T, tower="image", randomisation="none", rand_spearman=1.0))
        parts.append(rows("randomisation", m, T, tower="image", randomisation="cascading", rand_spearman=v))
        parts.append(rows("randomisation", m, T, tower="image", randomisation="cascading", rand_spearman=v + 0.1))
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def table() -> tuple[pd.DataFrame, list[str]]:
    return overview.setting_table(frame(), n_boot=N_BOOT, seed=0)


def ranks(t: pd.DataFrame, column_prefix: str) -> dict[str, float]:
    g = t[t["column"].str.startswith(column_prefix)]
    assert g["column"].nunique() == 1, set(g["column"])
    return g.set_index("method")["rank"].to_dict()


def test_headline_columns_and_directions(table) -> None:
    t, _ = table
    heads = t.drop_duplicates("column").set_index("column")
    assert list(heads.index) == ["sensitivity · fgsm ε=0.03 · spearman", "faithfulness · conf_drop_image",
                                 "localisation · miou", "randomisation (cascading) · rand_spearman",
                                 "complexity · sparseness (sensitivity)", "mean rank (samples A)",
                                 "mean rank (samples B)"]
    assert heads["higher_is_better"].to_dict() == {
        "sensitivity · fgsm ε=0.03 · spearman": True, "faithfulness · conf_drop_image": False,
        "localisation · miou": True, "randomisation (cascading) · rand_spearman": False,
        "complexity · sparseness (sensitivity)": True, "mean rank (samples A)": False, "mean rank (samples B)": False}


def test_ranks_ties_and_one_method(table) -> None:
    t, notes = table
    assert ranks(t, "sensitivity") == {"A": 1.0, "B": 2.5, "C": 2.5}  # the middle ε; a tie shares 2.5
    assert ranks(t, "localisation") == {"B": 1.0, "C": 2.0, "A": 3.0}  # miou, not the pointing game
    assert ranks(t, "randomisation") == {"A": 1.0, "C": 2.0, "B": 3.0}  # lower is better; "none" rows left out
    assert ranks(t, "complexity") == {"C": 1.0, "B": 2.0, "A": 3.0}
    f = t[t["column"] == "faithfulness · conf_drop_image"].iloc[0]
    assert f["method"] == "A" and f["rank"] == 1 and f["n_ranked"] == 1 and f["sample_set"] == ""
    assert any(n.startswith("faithfulness · conf_drop_image: one method only") for n in notes)


def test_studies_on_different_samples_are_not_ranked_together(table) -> None:
    t, notes = table
    sets = t.drop_duplicates("column").set_index("column")["sample_set"]
    assert sets["randomisation (cascading) · rand_spearman"] == "B"
    assert {sets["sensitivity · fgsm ε=0.03 · spearman"], sets["localisation · miou"],
            sets["complexity · sparseness (sensitivity)"]} == {"A"}
    mean_a = t[t["column"] == "mean rank (samples A)"].set_index("method")["mean"]
    assert mean_a.to_dict() == pytest.approx({"A": (1 + 3 + 3) / 3, "B": (2.5 + 1 + 2) / 3, "C": (2.5 + 2 + 1) / 3})
    mean_b = t[t["column"] == "mean rank (samples B)"].set_index("method")["mean"]
    assert mean_b.to_dict() == {"A": 1.0, "C": 2.0, "B": 3.0}
    assert "different samples" in notes[0] and "**B** (3 samples): randomisation" in notes[0]


def test_headline_number_and_interval(table) -> None:
    t, _ = table
    r = t[(t["column"].str.startswith("localisation")) & (t["method"] == "B")].iloc[0]
    mean, lo, hi = stats.bootstrap_ci(0.6 + OFFSET, n_boot=N_BOOT, seed=0)
    assert (r["mean"], r["lo"], r["hi"], r["n"]) == pytest.approx((0.6, lo, hi, 4)) and mean == pytest.approx(0.6)
    r = t[(t["column"].str.startswith("randomisation")) & (t["method"] == "C")].iloc[0]
    assert r["mean"] == pytest.approx(0.55) and r["n"] == 3  # per sample averaged over the randomised states


def test_shared_and_disjoint_samples_within_a_column() -> None:
    f = pd.concat([rows("faithfulness", "A", S, conf_drop_image=[1.0, 2.0, 3.0, np.nan]),
                   rows("faithfulness", "B", S, conf_drop_image=[2.0, 1.0, 1.0, 0.0])])
    col = overview._faithfulness(f)[0]
    out, ranked, note = overview.rank_column(col, n_boot=50)
    assert ranked and note == "methods compared on the 3 samples all of them share"
    assert out.set_index("method")["mean"].to_dict() == pytest.approx({"A": 2.0, "B": 4 / 3})  # B's s3 left out
    assert out.set_index("method")["rank"].to_dict() == {"A": 2.0, "B": 1.0}
    g = pd.concat([rows("faithfulness", "A", S[:2], conf_drop_image=1.0), rows("faithfulness", "B", S[2:], conf_drop_image=2.0)])
    out, ranked, note = overview.rank_column(overview._faithfulness(g)[0], n_boot=50)
    assert not ranked and out["rank"].isna().all() and "disjoint" in note


def test_random_weights_and_markdown() -> None:
    f = frame()
    f.loc[f["study"] != "faithfulness", "cfg.model.pretrained"] = None
    t, notes = overview.overview_table(f, n_boot=20)
    assert set(t["weights"]) == {"random"} and set(t["model"]) == {"m"}
    md = overview.setting_md(t)
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")][1:]
    assert [ln.split(" | ")[0] for ln in lines] == ["| B", "| C", "| A"]  # best first mean rank first; the B, C tie by name
    assert "#2.5/3" in md and "spearman ↑" in md and "rand_spearman ↓" in md


def test_curve_headlines_per_variant() -> None:
    parts = []
    for m, (pos, neg) in {"A": (0.2, 0.7), "B": (0.4, 0.6)}.items():
        for variant, v in (("positive", pos), ("negative", neg)):
            parts.append(rows("perturbation_curve", m, S, curve_variant=variant, target="gt", auc_hit=v + OFFSET))
        parts.append(rows("deletion_insertion", m, S, curve_variant="deletion", target="pred", auc_top1=pos))
    t, _ = overview.setting_table(pd.concat(parts, ignore_index=True), n_boot=20)
    assert ranks(t, "perturbation_curve · positive") == {"A": 1.0, "B": 2.0}  # lower is better
    assert ranks(t, "perturbation_curve · negative") == {"A": 1.0, "B": 2.0}  # higher is better
    assert ranks(t, "deletion_insertion · deletion · pred") == {"A": 1.0, "B": 2.0}
    assert t[t["category"] == "mean rank"].set_index("method")["mean"].to_dict() == {"A": 1.0, "B": 2.0}


def test_localisation_table_carries_segmentation_metrics() -> None:
    """The seg columns get a column each; under a perturbation the table reads their ``_pert`` values
    (the localisation study fills them as for the other metrics), never the clean ones."""
    from clip_xai.report import localisation
    from clip_xai.schema import LOCALISATION_METRICS

    base = [k for k in LOCALISATION_METRICS if k not in localisation.SEG_METRICS]
    parts = []
    for eps in (np.nan, 0.03):
        for m, miou in (("A", 0.4), ("B", 0.2)):
            r = rows("localisation", m, S, mask="entire_object", mask_area=0.3, perturbation="fgsm",
                     eps=eps, miou=miou + OFFSET, pixel_accuracy=0.8, mean_ap=0.7, sparseness=0.5, complexity=9.0,
                     sparseness_pert=0.4, complexity_pert=9.0, miou_pert=0.1, pixel_accuracy_pert=0.6, mean_ap_pert=0.5,
                     **{k: 0.5 for k in base}, **{f"{k}_pert": 0.4 for k in base})
            parts.append(r)
    loc = pd.concat(parts, ignore_index=True)
    summary, md = localisation.summary_table(loc, n_boot=20, seed=0)
    s = summary.set_index(["condition", "method", "metric"])["mean"]
    assert s[("clean", "A", "miou")] == pytest.approx(0.4) and s[("clean", "B", "mean_ap")] == pytest.approx(0.7)
    assert s[("fgsm", "A", "miou")] == pytest.approx(0.1)  # the perturbed map's value, never the clean one
    assert s[("fgsm", "A", "pointing_game")] == pytest.approx(0.4)
    assert "mIoU (per-image mean) ↑" in md and "Pixel accuracy ↑" in md and "mAP ↑" in md


def test_curve_settings_that_differ_get_their_own_columns(monkeypatch) -> None:
    from clip_xai import schema
    from clip_xai.report import curves

    monkeypatch.setattr(curves, "CONDITION_KEYS",
                        {**schema.CONDITION_KEYS, "perturbation_curve": ["curve_variant", "target", "curve_params"]})
    parts = [rows("perturbation_curve", m, S, curve_variant="positive", target="gt", curve_params=p, auc_hit=v)
             for m, v in (("A", 0.2), ("B", 0.4)) for p in ("per", "100")]
    parts.append(rows("faithfulness", "A", S, conf_drop_image=1.0))
    t, _ = overview.setting_table(pd.concat(parts, ignore_index=True), n_boot=10)
    assert {"perturbation_curve · positive · gt · curve_params=100 · auc_hit",
            "perturbation_curve · positive · gt · curve_params=per · auc_hit"} <= set(t["column"])
