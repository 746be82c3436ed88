"""Statistics for the report: bootstrap CIs, paired Wilcoxon tests with Holm correction, ranks."""
from __future__ import annotations

from itertools import combinations
from typing import Iterable

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

from clip_xai.schema import CURVE_HIGHER_IS_BETTER, HIGHER_IS_BETTER, REPEAT_KEY, SAMPLE_KEY, key_columns

# Both derived from the results schema's identifying columns (schema.key_columns), so every study's
# rows are tested and none are pooled across conditions: one family of tests (Holm-corrected
# together) / one ranking = a metric within one study × setting (dataset, model, image or text map)
# × condition (perturbation and ε, mask, randomised tower and unit, ...); within a family, rows of
# two methods are paired by sample, and repeats (seeds) of a method on a sample are averaged.
PAIR_KEY = SAMPLE_KEY
FAMILY = [c for c in key_columns() if c not in (*SAMPLE_KEY, *REPEAT_KEY)]


def bootstrap_ci(values: Iterable[float], n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap CI (resampling samples, NaN dropped): (mean, lo, hi)."""
    x = np.asarray(list(values) if not isinstance(values, (np.ndarray, pd.Series)) else values, float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return (np.nan, np.nan, np.nan)
    mean = float(x.mean())
    if x.size < 2 or n_boot < 1:
        return (mean, np.nan, np.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (mean, float(lo), float(hi))


BOOT_CHUNK = 1 << 22  # resample entries drawn at once by bootstrap_rows (32 MiB of int64 indices)


def bootstrap_rows(x: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column means of ``x`` (rows = samples, e.g. one curve per sample) and their percentile-bootstrap
    CIs, resampling whole rows with the same draws for every column (rows with a NaN are dropped
    first). Column k equals ``bootstrap_ci(x[:, k], n_boot, level, seed)`` on the kept rows (the same
    generator and draws, counted with a bincount) while n_boot × rows stays under BOOT_CHUNK; above
    it the draws come in chunks of resamples, so the memory stays bounded on large runs."""
    x = np.asarray(x, float)
    x = x[~np.isnan(x).any(axis=1)]
    n, p = x.shape
    nan = np.full(p, np.nan)
    if n == 0:
        return nan, nan.copy(), nan.copy()
    mean = x.mean(axis=0)
    if n < 2 or n_boot < 1:
        return mean, nan, nan.copy()
    rng = np.random.default_rng(seed)
    step = max(1, BOOT_CHUNK // n)
    means = np.empty((n_boot, p))
    for a in range(0, n_boot, step):
        b = min(n_boot, a + step)
        idx = rng.integers(0, n, size=(b - a, n))
        counts = np.bincount((idx + n * np.arange(b - a)[:, None]).ravel(), minlength=(b - a) * n).reshape(b - a, n)
        means[a:b] = counts @ x / n
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2], axis=0)
    return mean, lo, hi


def summarise(df: pd.DataFrame, metrics: list[str], by: list[str], n_boot: int = 1000,
              seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Long table: one row per group × metric with n, mean and bootstrap CI bounds lo/hi."""
    rows = []
    for key, g in df.groupby(by, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        for m in metrics:
            vals = g[m].to_numpy(float)
            mean, lo, hi = bootstrap_ci(vals, n_boot=n_boot, level=level, seed=seed)
            rows.append({**dict(zip(by, key)), "metric": m, "n": int((~np.isnan(vals)).sum()),
                         "mean": mean, "lo": lo, "hi": hi})
    return pd.DataFrame(rows, columns=[*by, "metric", "n", "mean", "lo", "hi"])


def holm(pvalues: Iterable[float]) -> np.ndarray:
    """Holm step-down adjusted p-values (same order as given; NaN stays NaN, not counted in m)."""
    p = np.asarray(list(pvalues), float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    q = p[ok]
    m = q.size
    if m == 0:
        return out
    order = np.argsort(q, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * q[order]))
    res = np.empty(m)
    res[order] = adj
    out[ok] = res
    return out


CURVE_METRICS = list(dict.fromkeys(m for d in CURVE_HIGHER_IS_BETTER.values() for m in d))


def higher_is_better(metric: str, family: dict | None = None) -> bool | None:
    """The direction of ``metric``: HIGHER_IS_BETTER, or for a curve AUC the direction of its
    family's ``curve_variant`` (schema.CURVE_HIGHER_IS_BETTER); None when unknown (not ranked)."""
    if metric in HIGHER_IS_BETTER:
        return HIGHER_IS_BETTER[metric]
    variant = (family or {}).get("curve_variant")
    return CURVE_HIGHER_IS_BETTER.get(variant, {}).get(metric) if isinstance(variant, str) else None


def study_metrics(df: pd.DataFrame) -> list[str]:
    """Scored metrics (keys of HIGHER_IS_BETTER and the curve AUCs) that have a value in `df`."""
    return [m for m in [*HIGHER_IS_BETTER, *CURVE_METRICS] if m in df.columns and df[m].notna().any()]


def _families(df: pd.DataFrame):
    """Yield (family dict, metric, higher is better, wide frame: PAIR_KEY rows × method columns, mean
    over repeats) for every metric whose direction is known in the family. FAMILY columns absent
    from ``df`` are left out; those a study lacks are NaN in its rows."""
    fam_cols = [c for c in FAMILY if c in df.columns]
    for key, g in df.groupby(fam_cols, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        fam = dict(zip(fam_cols, key))
        for metric in study_metrics(g):
            hib = higher_is_better(metric, fam)
            if hib is None:
                continue
            wide = g.groupby([*PAIR_KEY, "method"], sort=True)[metric].mean().unstack("method")
            yield fam, metric, hib, wide


def _frame(rows: list[dict], tail: list[str]) -> pd.DataFrame:
    """Rows with the family columns they carry first (in FAMILY order), then ``tail``."""
    present = [c for c in FAMILY if any(c in r for r in rows)]
    return pd.DataFrame(rows, columns=[*present, *tail])


def wilcoxon_p(diff) -> tuple[float, float]:
    """Two-sided Wilcoxon signed-rank (statistic, p) of paired differences, with the edge cases
    fixed here once for every table: all differences zero → (0, 1); a sample scipy refuses (e.g.
    one pair) → (NaN, NaN)."""
    d = np.asarray(diff, float)
    if (d == 0).all():
        return 0.0, 1.0
    try:
        res = wilcoxon(d)
    except ValueError:
        return float("nan"), float("nan")
    return float(res.statistic), float(res.pvalue)


def paired_tests(df: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Wilcoxon signed-rank test for every method pair per metric × ε, Holm-corrected per family."""
    cols = ["metric", "higher_is_better", "method_a", "method_b", "n", "mean_a", "mean_b", "mean_diff",
            "statistic", "p", "p_holm", "better", "significant"]
    out = []
    for fam, metric, hib, wide in _families(df):
        rows = []
        for a, b in combinations(sorted(wide.columns), 2):
            pair = wide[[a, b]].dropna()
            if len(pair) == 0:
                continue
            d = pair[a] - pair[b]
            stat, p = wilcoxon_p(d)
            diff = float(d.mean())
            sign = diff if hib else -diff
            better = a if sign > 0 else b if sign < 0 else "tie"
            rows.append({**fam, "metric": metric, "higher_is_better": hib, "method_a": a, "method_b": b, "n": len(pair),
                         "mean_a": float(pair[a].mean()), "mean_b": float(pair[b].mean()),
                         "mean_diff": diff, "statistic": stat, "p": p, "better": better})
        if rows:
            adj = holm([r["p"] for r in rows])
            for r, q in zip(rows, adj):
                r["p_holm"] = q
                r["significant"] = bool(q < alpha) if not np.isnan(q) else False
            out.extend(rows)
    return _frame(out, cols)


def rank_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean rank (1 = best, ties averaged) of methods per metric × ε over samples where all have a value."""
    cols = ["metric", "higher_is_better", "method", "mean_rank", "mean", "n_samples"]
    out = []
    for fam, metric, hib, wide in _families(df):
        complete = wide.dropna()
        if wide.shape[1] < 2 or len(complete) == 0:
            continue
        ranks = complete.rank(axis=1, ascending=not hib, method="average")
        mean_rank = ranks.mean().sort_values()
        for method, r in mean_rank.items():
            out.append({**fam, "metric": metric, "higher_is_better": hib, "method": method, "mean_rank": float(r),
                        "mean": float(complete[method].mean()), "n_samples": len(complete)})
    return _frame(out, cols)
