"""The report's faithfulness-curve section (perturbation_curve, deletion_insertion) on hand-made rows:
list columns through collect, the mean curves and their bands against a direct bootstrap, the AUC
table against hand values, the AUC paired tests with the variant's direction, and bad curves."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clip_xai.errors import ClipXaiError
from clip_xai.report import collect, curves, stats
from clip_xai.report.index import make_report
from clip_xai.schema import ID_COLUMNS
from tests.test_report import write_run

N = 12
N_BOOT = 200
FRACTION = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
#: Per method: how fast its positive curve falls (a faithful map: fast) and its negative one (slow).
SLOPE = {"gradcam": {"positive": 1.6, "negative": 0.2}, "rollout": {"positive": 0.8, "negative": 0.6}}
DELINS = {"eclip": {"deletion": 1.5, "insertion": 1.4}, "gradcam": {"deletion": 0.7, "insertion": 0.9}}


def curve_rows(expl: str, study: str, variant: str, target: str, slope: float, seed: int,
               scores: tuple[str, ...], n: int = N, model: str = "tiny") -> pd.DataFrame:
    """One row per sample: a linear curve from 1 with a per-sample slope jitter, and its trapezoid AUC."""
    rng = np.random.default_rng(seed)
    fr = np.asarray(FRACTION)
    rising = variant == "insertion"
    rows = []
    for i in range(n):
        s = slope + rng.normal(0, 0.1)
        c = np.clip(s * fr, 0, 1) if rising else np.clip(1 - s * fr, 0, 1)
        row = {"sample_id": f"s{i:02d}", "caption": "a photo", "label": i % 3, "dataset": "imagenet", "model": model,
               "explainer": expl, "modality": "image", "study": study, "seed": 0, "curve_variant": variant,
               "target": target, "curve_fraction": list(fr), "precision": "fp32", "map_flag": ""}
        row["curve_params"] = "{}"  # both curve studies' JSON of their other settings (a condition column)
        for k, sc in enumerate(scores):
            curve = c * (1.0 - 0.1 * k)
            row[f"curve_{sc}"] = list(curve)
            row[f"auc_{sc}"] = float(np.trapezoid(curve, fr))
        rows.append(row)
    df = pd.DataFrame(rows)
    return df[[*ID_COLUMNS, *[c for c in df.columns if c not in ID_COLUMNS]]]


def cfg(study: str, expl: str) -> dict:
    return {"study": {"name": study}, "explainer": {"name": expl}, "dataset": {"name": "imagenet"},
            "model": {"name": "tiny", "pretrained": None}, "seed": 0}


def build_curves(root: Path) -> Path:
    """A perturbation_curve sweep (2 methods × positive/negative, gt) and a deletion_insertion
    sweep (2 methods × deletion/insertion × gt/pred)."""
    job = 0
    for expl, slopes in SLOPE.items():
        for variant, slope in slopes.items():
            write_run(root / "pc" / str(job), cfg("perturbation_curve", expl),
                      curve_rows(expl, "perturbation_curve", variant, "gt", slope, job,
                                 ("hit", "prob_diff")))
            job += 1
    for expl, slopes in DELINS.items():
        for variant, slope in slopes.items():
            for target in ("gt", "pred"):
                write_run(root / "di" / str(job), cfg("deletion_insertion", expl),
                          curve_rows(expl, "deletion_insertion", variant, target, slope, job, ("top1",)))
                job += 1
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return build_curves(tmp_path_factory.mktemp("curves"))


@pytest.fixture(scope="module")
def frame(root: Path) -> pd.DataFrame:
    return collect.collect([root]).frame


@pytest.fixture(scope="module")
def report(root: Path, frame: pd.DataFrame) -> Path:
    out = root.parent / "curves_out"
    make_report([root], out=out, n_boot=N_BOOT)
    return out


def test_list_columns_load_and_round_trip(frame: pd.DataFrame, report: Path) -> None:
    assert len(frame) == (4 + 8) * N
    v = frame["curve_hit"].dropna().iloc[0]
    assert np.allclose(np.asarray(v, float), np.asarray(frame["curve_hit"].dropna().iloc[0], float))
    assert len(v) == len(FRACTION)
    back = pd.read_parquet(report / "results.parquet")  # the report's own frame keeps the lists
    pc = back[back["study"] == "perturbation_curve"]
    assert np.allclose(np.asarray(pc["curve_fraction"].iloc[0], float), FRACTION)
    assert back.loc[back["study"] == "deletion_insertion", "curve_hit"].isna().all()


def test_mean_curve_and_band_equal_a_direct_bootstrap(frame: pd.DataFrame) -> None:
    rows = frame[frame["study"] == "perturbation_curve"]
    s = curves.summary(rows, n_boot=N_BOOT, seed=3)
    g = rows[(rows["method"] == "gradcam") & (rows["curve_variant"] == "positive")].sort_values("sample_id")
    x = np.stack([np.asarray(v, float) for v in g["curve_prob_diff"]])
    got = s[(s["method"] == "gradcam") & (s["curve_variant"] == "positive") & (s["score"] == "prob_diff")]
    got = got.sort_values("point")
    assert list(got["fraction"]) == FRACTION and (got["n"] == N).all()
    for k in range(len(FRACTION)):
        mean, lo, hi = stats.bootstrap_ci(x[:, k], n_boot=N_BOOT, seed=3)
        r = got.iloc[k]
        assert r["mean"] == pytest.approx(x[:, k].mean()) == pytest.approx(mean)
        assert (r["lo"], r["hi"]) == pytest.approx((lo, hi))
    assert got.iloc[0]["mean"] == pytest.approx(0.9)  # point 0 = the clean image (prob_diff = 0.9 × curve)


def test_auc_table_intervals_directions_and_hand_value(frame: pd.DataFrame) -> None:
    rows = frame[frame["study"] == "perturbation_curve"]
    auc = curves.auc_summary(rows, n_boot=N_BOOT, seed=1)
    g = rows[(rows["method"] == "rollout") & (rows["curve_variant"] == "negative")]
    r = auc[(auc["method"] == "rollout") & (auc["curve_variant"] == "negative") & (auc["metric"] == "auc_hit")].iloc[0]
    hand = np.mean([np.trapezoid(np.asarray(c, float), FRACTION) for c in g["curve_hit"]])
    assert r["mean"] == pytest.approx(hand)
    assert (r["lo"], r["hi"]) == pytest.approx(stats.bootstrap_ci(g["auc_hit"].to_numpy(), n_boot=N_BOOT, seed=1)[1:])
    assert r["lo"] < r["mean"] < r["hi"] and r["n"] == N
    dirs = auc.drop_duplicates(["curve_variant", "metric"]).set_index(["curve_variant", "metric"])["higher_is_better"]
    assert not dirs[("positive", "auc_hit")] and dirs[("negative", "auc_hit")]
    assert not dirs[("positive", "auc_prob_diff")] and dirs[("negative", "auc_prob_diff")]  # schema.CURVE_HIGHER_IS_BETTER
    md = curves.auc_md(auc)
    unknown = curves.auc_md(auc.assign(higher_is_better=auc["higher_is_better"].astype(object).where(
        auc["metric"] != "auc_prob_diff", None)))  # a score the schema gives no direction: shown, never ranked
    assert "auc_prob_diff (direction unknown)" in unknown and "auc_prob_diff (direction unknown)" not in md
    sections = {s.split(" · ")[1]: s for s in md.split("\n## ")[1:]}
    m = auc[auc["metric"] == "auc_hit"].set_index(["curve_variant", "method"])["mean"]
    # gradcam's map is the faithful one: its positive AUC is the lower (↓ wins), its negative AUC the higher (↑ wins)
    assert m[("positive", "gradcam")] < m[("positive", "rollout")] and m[("negative", "gradcam")] > m[("negative", "rollout")]
    for variant in ("positive", "negative"):
        assert "| gradcam | **" in sections[variant] and "| rollout | **" not in sections[variant]


def test_auc_paired_tests_honour_the_variant(frame: pd.DataFrame) -> None:
    tests = stats.paired_tests(frame)
    pc = tests[(tests["study"] == "perturbation_curve") & (tests["metric"] == "auc_hit")].set_index("curve_variant")
    assert pc.loc["positive", "better"] == "gradcam" and not pc.loc["positive", "higher_is_better"]
    assert pc.loc["negative", "better"] == "gradcam" and pc.loc["negative", "higher_is_better"]
    assert pc.loc["positive", "mean_diff"] < 0 < pc.loc["negative", "mean_diff"]  # a = gradcam, b = rollout
    assert set(tests["metric"]) >= {"auc_hit", "auc_top1"}
    # every AUC the schema gives a direction is tested (auc_prob_diff: lower is better for positive)
    assert set(tests["metric"]) == {"auc_hit", "auc_prob_diff", "auc_top1"}
    di = tests[(tests["study"] == "deletion_insertion") & (tests["metric"] == "auc_top1")]
    assert len(di) == 4  # deletion/insertion × gt/pred: never pooled
    assert set(di.loc[di["curve_variant"] == "deletion", "better"]) == {"eclip"}
    assert set(di.loc[di["curve_variant"] == "insertion", "better"]) == {"eclip"}
    ranks = stats.rank_table(frame)
    r = ranks[(ranks["metric"] == "auc_hit") & (ranks["curve_variant"] == "positive")].set_index("method")
    assert r.loc["gradcam", "mean_rank"] < r.loc["rollout", "mean_rank"]


def test_report_files(report: Path) -> None:
    index = (report / "index.md").read_text()
    for name in ("curves_perturbation_curve", "curves_deletion_insertion"):
        assert (report / "figures" / f"{name}.png").is_file() and f"(figures/{name}.png)" in index
    for name in ("auc_perturbation_curve", "auc_deletion_insertion", "curves_perturbation_curve", "wilcoxon", "ranks"):
        assert (report / "tables" / f"{name}.csv").is_file()
    pts = pd.read_csv(report / "tables" / "curves_deletion_insertion.csv")
    assert set(pts["score"]) == {"top1"} and set(pts["target"]) == {"gt", "pred"}
    assert "random weights" in index  # the tiny model has no pretrained weights
    assert "auc_hit ↓" in (report / "tables" / "wilcoxon.md").read_text()


def test_curves_on_different_points_are_refused(tmp_path: Path) -> None:
    a = curve_rows("gradcam", "perturbation_curve", "positive", "gt", 1.0, 0, ("hit",))
    b = a.copy()
    b["curve_fraction"] = [list(np.linspace(0, 0.9, len(FRACTION)))] * len(b)
    b["sample_id"] = b["sample_id"] + "b"
    with pytest.raises(ClipXaiError, match="different fractions"):
        curves.summary(pd.concat([a, b], ignore_index=True).assign(method="gradcam"), n_boot=10)
    short = a.assign(method="gradcam")
    short.at[0, "curve_hit"] = [1.0, 0.5]
    with pytest.raises(ClipXaiError, match="2 points"):
        curves.summary(short, n_boot=10)


def test_bootstrap_rows_in_chunks(monkeypatch) -> None:
    """Chunked draws (large runs) give a band as wide as the one-shot draws, and the means exactly."""
    x = np.random.default_rng(5).normal(0, 1, (40, 3))
    whole = stats.bootstrap_rows(x, n_boot=400, seed=2)
    monkeypatch.setattr(stats, "BOOT_CHUNK", 40 * 7)  # 7 resamples per chunk
    chunked = stats.bootstrap_rows(x, n_boot=400, seed=2)
    assert np.allclose(whole[0], chunked[0])
    assert np.allclose(whole[1], chunked[1], atol=0.1) and np.allclose(whole[2], chunked[2], atol=0.1)
    assert (chunked[1] < chunked[0]).all() and (chunked[0] < chunked[2]).all()


def test_a_further_condition_column_keeps_curves_apart() -> None:
    """Rows that differ in another condition column (e.g. the step settings) are summarised apart,
    not refused as mismatched curves, when the schema names that column a condition."""
    from clip_xai import schema

    a = curve_rows("gradcam", "perturbation_curve", "positive", "gt", 1.0, 0, ("hit",)).assign(curve_params="per")
    b = a.assign(curve_params="100", curve_fraction=[list(np.linspace(0, 0.45, len(FRACTION)))] * len(a))
    rows = pd.concat([a, b], ignore_index=True).assign(method="gradcam")
    cond = {**schema.CONDITION_KEYS, "perturbation_curve": ["curve_variant", "target", "curve_params"]}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(curves, "CONDITION_KEYS", cond)
        s = curves.summary(rows, n_boot=10)
        auc = curves.auc_summary(rows, n_boot=10)
        md = curves.auc_md(auc)
    assert set(s["curve_params"]) == {"per", "100"} and len(auc) == 2
    assert s.loc[s["curve_params"] == "100", "fraction"].max() == pytest.approx(0.45)
    assert "curve_params=100" in md and "curve_params=per" in md


def test_empty_curves_are_missing_not_errors() -> None:
    """Deletion/insertion writes ``[]`` for a flagged map (every list column) and for a score left out
    of study.topk (here topk=[1]: curve_top5/10 empty everywhere): such a sample has no curve for that
    score (counted by map_flag), the score no figure row, and nothing is refused."""
    rows = curve_rows("eclip", "deletion_insertion", "deletion", "gt", 1.0, 0, ("top1",)).assign(method="eclip")
    rows["curve_top5"] = [[] for _ in range(N)]
    rows["curve_top10"] = [[] for _ in range(N)]
    rows["auc_top5"] = rows["auc_top10"] = np.nan
    for c in ("curve_fraction", "curve_top1"):
        rows.at[0, c] = []
    rows.at[0, "auc_top1"], rows.at[0, "map_flag"] = np.nan, "constant_image"
    assert curves.scores(rows) == ["top1"]
    s = curves.summary(rows, n_boot=10)
    assert set(s["score"]) == {"top1"} and list(s["fraction"]) == FRACTION and (s["n"] == N - 1).all()
    x = np.stack([np.asarray(v, float) for v in rows["curve_top1"].iloc[1:]])
    assert np.allclose(s.sort_values("point")["mean"], x.mean(0))
    auc = curves.auc_summary(rows, n_boot=10)
    assert auc.set_index("metric").loc["auc_top1", "n"] == N - 1


def test_deletion_insertion_runs_with_other_settings_are_not_pooled() -> None:
    """The schema names curve_params a condition of deletion/insertion: two replacement settings of
    one method are two AUC rows and two curves, not one pooled mean."""
    a = curve_rows("eclip", "deletion_insertion", "deletion", "gt", 1.0, 0, ("top1",))
    b = curve_rows("eclip", "deletion_insertion", "deletion", "gt", 0.2, 1, ("top1",))
    rows = pd.concat([a.assign(curve_params='{"replacement": "random"}'),
                      b.assign(curve_params='{"replacement": "black"}')], ignore_index=True).assign(method="eclip")
    auc = curves.auc_summary(rows, n_boot=10).set_index("curve_params")
    assert len(auc) == 2
    assert auc.loc['{"replacement": "black"}', "mean"] == pytest.approx(b["auc_top1"].mean())
    assert set(curves.summary(rows, n_boot=10)["curve_params"]) == set(rows["curve_params"])
