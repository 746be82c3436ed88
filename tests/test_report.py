"""The report package on a synthetic study: frame, statistics, figures, tables, index.md, CLI, errors."""
from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.stats import wilcoxon

from clip_xai.errors import ClipXaiError
from clip_xai.report import collect, stats
from clip_xai.report.__main__ import main
from clip_xai.report.index import make_report
from clip_xai.schema import OPTIONAL_COLUMNS, FAITHFULNESS_COLUMNS, SENSITIVITY_COLUMNS

N = 40
EXPLAINERS = ["eclip", "gradcam", "rise"]
EPS = [0.01, 0.03]
BASE = {"eclip": 0.9, "gradcam": 0.7, "rise": 0.5}
OFFSET = {"spearman": 0.0, "ssim": -0.1, "topk": -0.2}
LAYERS, STEPS = [8, 10], [5, 10]
FLAGGED = 2  # rise rows at the largest ε with an unusable map


def true_mean(expl: str, eps: float, metric: str) -> float:
    """Generating mean of a sensitivity metric."""
    return BASE[expl] + OFFSET[metric] - 5 * eps


def faith_mean(layer: int, steps: int) -> float:
    """Generating mean of abm's conf_drop_image."""
    return 10 + 0.1 * layer + 0.01 * steps


def centred(rng: np.random.Generator, mu: float, valid: np.ndarray, sd: float = 0.05) -> np.ndarray:
    """Values with sample mean exactly mu over the valid rows (NaN elsewhere)."""
    noise = rng.normal(0, sd, N)
    noise[valid] -= noise[valid].mean()
    out = mu + noise
    out[~valid] = np.nan
    return out


def write_run(d: Path, cfg: dict, rows: pd.DataFrame, done: bool = True, examples: dict | None = None) -> None:
    """One run dir following schema.py."""
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rows.to_parquet(d / "results.parquet", index=False)
    (d / "summary.json").write_text("{}")
    if examples is not None:
        np.savez(d / "examples.npz", **examples)
    if done:
        (d / "DONE").write_text("")


def ident(expl: str, study: str) -> dict:
    """Identity columns for N samples."""
    return {"sample_id": [f"s{i:03d}" for i in range(N)], "caption": [f"a photo of thing {i}" for i in range(N)],
            "label": np.arange(N) % 5, "dataset": "coco", "model": "ViT-B-16", "explainer": expl,
            "modality": "image", "study": study, "seed": 0}


def sens_rows(expl: str, eps: float, seed: int) -> pd.DataFrame:
    """Sensitivity rows with known means (a few flagged rows for rise at the largest ε)."""
    rng = np.random.default_rng(seed)
    valid = np.ones(N, bool)
    flag = np.array([""] * N, dtype=object)
    if expl == "rise" and eps == EPS[-1]:
        valid[:FLAGGED] = False
        flag[:FLAGGED] = "constant_clean"
    df = pd.DataFrame({**ident(expl, "sensitivity"), "perturbation": "gaussian", "eps": eps,
                       "perturbation_params": "{}", "linf": eps, "clamped": 0.0, "objective": np.nan,
                       "sim_orig": 0.3, "sim_pert": 0.29, "sim_diff": rng.normal(-0.05, 0.02, N),
                       **{m: centred(rng, true_mean(expl, eps, m), valid) for m in OFFSET}, "map_flag": flag,
                       "sparseness": 0.5, "complexity": 9.0, "sparseness_pert": 0.5, "complexity_pert": 9.0,
                       "caption_flag": ""})
    return df.assign(**{c: v for c, v in OPTIONAL_COLUMNS.items() if c not in df})[SENSITIVITY_COLUMNS]


def examples(eps: float, seed: int, n: int = 3, hw: int = 16) -> dict:
    """examples.npz arrays for the first n samples."""
    rng = np.random.default_rng(seed)
    return {"sample_id": np.array([f"s{i:03d}" for i in range(n)]), "caption": np.array(["cap"] * n),
            "image": rng.integers(0, 255, (n, hw, hw, 3), dtype=np.uint8),
            "map_clean": rng.random((n, hw, hw)).astype(np.float16),
            "image_pert": rng.integers(0, 255, (n, hw, hw, 3), dtype=np.uint8),
            "map_pert": rng.random((n, hw, hw)).astype(np.float16), "eps": np.array(eps)}


def faith_rows(expl: str, seed: int, mu: float) -> pd.DataFrame:
    """Faithfulness rows; gradcam has no text modality (NaN text metrics)."""
    rng = np.random.default_rng(seed)
    valid = np.ones(N, bool)
    text = np.full(N, np.nan) if expl == "gradcam" else centred(rng, 5.0, valid)
    df = pd.DataFrame({**ident(expl, "faithfulness"), "sim_orig": 0.3,
                       "conf_drop_image": centred(rng, mu, valid), "conf_incr_image": centred(rng, 20, valid),
                       "conf_drop_text": text, "conf_incr_text": text, "road": centred(rng, 0.4, valid),
                       "road_morf": 0.2, "road_lerf": 0.6, "map_flag": "", "sparseness_image": 0.5,
                       "complexity_image": 9.0, "sparseness_text": 0.3, "complexity_text": 1.0, "caption_flag": ""})
    return df[FAITHFULNESS_COLUMNS]


def cfg(study: str, expl: dict, eps: float | None = None) -> dict:
    """A resolved job config."""
    c = {"study": {"name": study, "save_examples": 3}, "explainer": expl, "dataset": {"name": "coco"},
         "model": {"name": "ViT-B-16", "pretrained": "openai"}, "seed": 0, "tags": ["x", "y"]}
    if eps is not None:
        c["perturbation"] = {"name": "gaussian", "eps": eps}
    return c


def build_study(root: Path) -> Path:
    """A sensitivity multirun (3 explainers × 2 ε + one incomplete job) and an abm layer × steps faithfulness sweep."""
    sens = root / "sens_sweep"
    sens.mkdir(parents=True)
    (sens / "multirun.yaml").write_text("hydra: {}\n")
    job = 0
    for expl in EXPLAINERS:
        for eps in EPS:
            write_run(sens / str(job), cfg("sensitivity", {"name": expl}, eps), sens_rows(expl, eps, job),
                      examples=examples(eps, job))
            job += 1
    write_run(sens / str(job), cfg("sensitivity", {"name": "eclip"}, 0.1), sens_rows("eclip", 0.01, 99), done=False)
    faith = root / "nested" / "faith_sweep"
    faith.mkdir(parents=True)
    (faith / "multirun.yaml").write_text("hydra: {}\n")
    job = 0
    for layer in LAYERS:
        for steps in STEPS:
            write_run(faith / str(job), cfg("faithfulness", {"name": "abm", "target_layer": layer, "steps": steps}),
                      faith_rows("abm", 100 + job, faith_mean(layer, steps)))
            job += 1
    write_run(faith / str(job), cfg("faithfulness", {"name": "gradcam"}), faith_rows("gradcam", 200, 15.0))
    return root


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """The synthetic study root."""
    return build_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def report(study: Path) -> Path:
    """Report written once through the CLI (few bootstrap resamples to stay fast)."""
    out = study.parent / "out"
    assert main([str(study), "--out", str(out), "--n-boot", "200", "--grid-samples", "2"]) == 0
    return out


def test_frame_rows_and_cfg_columns(study: Path) -> None:
    c = collect.collect([study])
    df = c.frame
    assert len(c.runs) == 6 + 5 and len(c.incomplete) == 1 and c.incomplete[0].name == "6"
    assert len(df) == 6 * N + 5 * N
    for col in ["cfg.explainer.name", "cfg.perturbation.eps", "cfg.explainer.target_layer", "cfg.explainer.steps",
                "cfg.dataset.name", "cfg.model.name", "cfg.model.pretrained", "cfg.seed", "run_dir", "sweep", "method"]:
        assert col in df.columns, col
    assert "cfg.tags" not in df.columns  # lists are not scalars
    sens = df[df.study == "sensitivity"]
    assert set(sens["sweep"]) == {str((study / "sens_sweep").resolve())}
    assert (sens["cfg.perturbation.eps"] == sens["eps"]).all()
    assert sens.groupby(["explainer", "eps"]).size().eq(N).all()
    faith = df[df.study == "faithfulness"]
    assert set(faith["sweep"]) == {str((study / "nested" / "faith_sweep").resolve())}
    assert sorted(faith["cfg.explainer.target_layer"].dropna().unique()) == LAYERS
    assert "abm[target_layer=8, steps=5]" in set(faith["method"]) and "gradcam" in set(faith["method"])
    assert set(sens["method"]) == set(EXPLAINERS)


def test_flatten() -> None:
    assert collect.flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": [1], "f": None}) == {"a.b": 1, "a.c.d": "x", "f": None}


def test_means_and_bootstrap_ci(report: Path) -> None:
    s = pd.read_csv(report / "tables" / "sensitivity_summary.csv")
    assert len(s) == len(EXPLAINERS) * len(EPS) * len(OFFSET)
    for r in s.itertuples():
        mu = true_mean(r.method, r.eps, r.metric)
        assert r.mean == pytest.approx(mu, abs=1e-9)
        assert r.lo <= mu <= r.hi and r.hi - r.lo < 0.1
        assert r.n == (N - FLAGGED if (r.method == "rise" and r.eps == EPS[-1]) else N)


def test_bootstrap_ci_seeded_and_covers() -> None:
    x = np.random.default_rng(1).normal(3.0, 1.0, 200)
    a, b = stats.bootstrap_ci(x, n_boot=300, seed=5), stats.bootstrap_ci(x, n_boot=300, seed=5)
    assert a == b and a[1] < 3.0 < a[2] and a[1] < a[0] < a[2]
    assert np.isnan(stats.bootstrap_ci([np.nan])[0])


def test_holm_hand_worked() -> None:
    # sorted p: .005*4=.02, .01*3=.03, .03*2=.06, .04*1=.04 -> running max .06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    out = stats.holm([0.02, np.nan, 0.01])
    assert np.isnan(out[1]) and out[[0, 2]] == pytest.approx([0.02, 0.02])


def test_wilcoxon_matches_scipy_and_holm(study: Path, report: Path) -> None:
    t = pd.read_csv(report / "tables" / "wilcoxon.csv")
    df = collect.collect([study]).frame
    fam = t[(t.metric == "spearman") & (t.eps == EPS[-1])]
    assert len(fam) == 3 and fam["p_holm"].to_numpy() == pytest.approx(stats.holm(fam["p"]))
    row = fam[(fam.method_a == "eclip") & (fam.method_b == "rise")].iloc[0]
    s = df[(df.study == "sensitivity") & (df.eps == EPS[-1])]
    a = s[s.method == "eclip"].set_index("sample_id")["spearman"]
    b = s[s.method == "rise"].set_index("sample_id")["spearman"]
    pair = pd.concat([a, b], axis=1, keys=["a", "b"]).dropna()
    assert row.n == N - FLAGGED
    assert row.p == pytest.approx(wilcoxon(pair["a"], pair["b"]).pvalue, rel=1e-12)
    assert row.better == "eclip" and bool(row.significant)


def test_ranking_constructed_case() -> None:
    rows = []
    for i in range(5):
        for method, v in [("A", 3.0), ("B", 2.0), ("C", 2.0 if i % 2 else 1.0)]:
            rows.append({"study": "sensitivity", "perturbation": "g", "eps": 0.1, "sample_id": f"s{i}",
                         "dataset": "d", "model": "m", "method": method, "spearman": v, "sim_diff": v})
    rows.append({**rows[0], "method": "D", "spearman": 9.0, "sim_diff": 9.0})  # one sample only: drops complete set
    r = stats.rank_table(pd.DataFrame(rows[:-1]))
    sp = r[r.metric == "spearman"].set_index("method")
    # C ties B on 2 of 5 samples (rank 2.5 each), else C is 3rd and B 2nd
    assert sp.loc["A", "mean_rank"] == 1.0
    assert sp.loc["B", "mean_rank"] == pytest.approx((3 * 2 + 2 * 2.5) / 5)
    assert sp.loc["C", "mean_rank"] == pytest.approx((3 * 3 + 2 * 2.5) / 5)
    sd = r[r.metric == "sim_diff"].set_index("method")  # lower is better
    assert sd.loc["A", "mean_rank"] == 3.0 and list(sd.index)[0] == "C"
    r2 = stats.rank_table(pd.DataFrame(rows))
    assert set(r2["n_samples"]) == {1}


def test_files_and_index(report: Path) -> None:
    figs = ["sensitivity_vs_eps", "spearman_vs_simdiff", "ssim_vs_simdiff", "topk_vs_simdiff", "qualitative_grid"]
    tabs = ["sensitivity_summary", "faithfulness", "road", "ablation_abm", "wilcoxon", "ranks", "counts"]
    index = (report / "index.md").read_text()
    for f in figs:
        for ext in ("png", "pdf"):
            p = report / "figures" / f"{f}.{ext}"
            assert p.is_file() and p.stat().st_size > 1000, p
            assert f"(figures/{f}.{ext})" in index
    for t in tabs:
        for ext in ("md", "csv"):
            assert (report / "tables" / f"{t}.{ext}").is_file()
            assert f"(tables/{t}.{ext})" in index
    assert "(results.parquet)" in index and "(results.csv)" in index
    assert "incomplete runs skipped (no `DONE`): **1**" in index and "runs found: **11**" in index
    out = pd.read_parquet(report / "results.parquet")
    assert len(out) == 6 * N + 5 * N and len(pd.read_csv(report / "results.csv")) == len(out)
    counts = pd.read_csv(report / "tables" / "counts.csv").set_index(["study", "explainer"])
    assert counts.loc[("sensitivity", "rise"), "rows_map_flag"] == FLAGGED
    assert counts.loc[("sensitivity", "rise"), "rows_nan_metric"] == FLAGGED
    assert counts.loc[("sensitivity", "eclip"), "rows_map_flag"] == 0
    assert counts.loc[("faithfulness", "gradcam"), "rows_nan_metric"] == 0  # no text modality is not a NaN


def test_faithfulness_and_ablation_tables(report: Path) -> None:
    f = pd.read_csv(report / "tables" / "faithfulness.csv").set_index("method")
    assert f.loc["abm[target_layer=10, steps=5]", "coco · image · drop ↓"] == pytest.approx(faith_mean(10, 5))
    assert np.isnan(f.loc["gradcam", "coco · text · drop ↓"])
    assert "**15.000**" not in (report / "tables" / "faithfulness.md").read_text()  # gradcam's drop is the worst
    a = pd.read_csv(report / "tables" / "ablation_abm.csv")
    a = a[a.metric == "conf_drop_image"]
    assert len(a) == 4
    for r in a.itertuples():
        assert r.mean == pytest.approx(faith_mean(r.target_layer, r.steps))
    assert "target_layer \\ steps" in (report / "tables" / "ablation_abm.md").read_text()


def test_report_output_not_read_back_as_runs(study: Path, tmp_path: Path) -> None:
    r = make_report([study / "nested"], n_boot=10)  # default out: <first dir>/report
    assert r.index == study / "nested" / "report" / "index.md" and r.index.is_file()
    text = r.index.read_text()
    assert "sensitivity figures and tables: no sensitivity rows" in text
    assert not list((study / "nested" / "report").glob("figures/*.png"))
    assert len(collect.collect([study / "nested"]).runs) == 5


def test_empty_and_missing_dirs(tmp_path: Path, capsys) -> None:
    with pytest.raises(ClipXaiError, match="no complete runs"):
        collect.collect([tmp_path])
    with pytest.raises(ClipXaiError, match="not a directory"):
        collect.collect([tmp_path / "nope"])
    assert main([str(tmp_path)]) == 2
    assert "fix:" in capsys.readouterr().err


def test_only_incomplete_runs(tmp_path: Path) -> None:
    write_run(tmp_path / "r", cfg("sensitivity", {"name": "rise"}, 0.01), sens_rows("rise", 0.01, 0), done=False)
    with pytest.raises(ClipXaiError, match="1 incomplete"):
        collect.collect([tmp_path])


def test_incompatible_runs(study: Path, tmp_path: Path) -> None:
    src = study / "sens_sweep" / "0"
    shutil.copytree(src, tmp_path / "copy")  # identical rerun: rows dropped once, not double counted
    c = collect.collect([study / "sens_sweep", tmp_path])
    assert c.duplicates_dropped == N and len(c.frame) == 6 * N
    df = pd.read_parquet(tmp_path / "copy" / "results.parquet")
    df["spearman"] += 0.1
    df.to_parquet(tmp_path / "copy" / "results.parquet")
    with pytest.raises(ClipXaiError, match="different results"):
        collect.collect([study / "sens_sweep", tmp_path])
    df.drop(columns=["ssim"]).to_parquet(tmp_path / "copy" / "results.parquet")
    with pytest.raises(ClipXaiError, match="lacks schema columns"):
        collect.collect([tmp_path])


def test_wandb_logging_always_finishes(report: Path, monkeypatch) -> None:
    calls: list[str] = []

    class Run:
        summary: dict = {}

        def log(self, d: dict) -> None:
            calls.append("log")
            raise RuntimeError("network down")

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw["job_type"]) or Run(),
                                 Image=lambda p: p, Table=lambda dataframe: dataframe,
                                 finish=lambda: calls.append("finish"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    from clip_xai.report.wandb_log import log_report

    with pytest.raises(RuntimeError):
        log_report(report, sorted((report / "figures").glob("*")), sorted((report / "tables").glob("*")), {})
    assert calls == ["report", "log", "finish"]


def test_random_weight_models_are_named(report: Path) -> None:
    """Pretrained runs carry no warning; a frame with a random-weight model names it."""
    from clip_xai.report.index import _random_weight_models

    assert "random weights" not in (report / "index.md").read_text()
    frame = pd.DataFrame({"model": ["tiny", "vit_b16", "altclip_tiny"],
                          "cfg.model.pretrained": [None, "openai", False]})
    assert _random_weight_models(frame) == ["altclip_tiny", "tiny"]
