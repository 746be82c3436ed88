"""A grid of mean-with-CI-band curves, one curve per method (the sensitivity, localisation and randomisation figures)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd
import seaborn as sns

from clip_xai.report import figures, palette


def band_grid(summary: pd.DataFrame, group_by: list[str], metrics: list[str], x: str, out_dir: Path, name: str,
              label: Callable, width: float = 3.4, height: float = 3.0, pal: dict | None = None) -> list[Path]:
    """Rows = groups of ``group_by``, columns = ``metrics``; each panel plots ``mean`` against ``x`` per
    method with its ``lo``–``hi`` band, in the report's colour per method (``pal``). ``label(ax, key,
    metric, panel_frame)`` titles and labels a panel. One legend for the grid, below it."""
    methods = palette.ordered(summary["method"].unique())
    pal = figures.method_colours(methods, pal)
    groups = list(summary.groupby(group_by, sort=True, dropna=False))
    handles: dict[str, object] = {}
    with sns.axes_style("whitegrid"):
        fig, axes = figures._figure(len(groups), len(metrics), width, height)
        for i, (key, g) in enumerate(groups):
            for j, metric in enumerate(metrics):
                ax, d = axes[i, j], g[g["metric"] == metric].sort_values(x)
                for method in [m for m in methods if m in set(d["method"])]:
                    c = d[d["method"] == method]
                    ax.fill_between(c[x], c["lo"], c["hi"], color=pal[method], alpha=0.2, linewidth=0)
                    handles[method], = ax.plot(c[x], c["mean"], marker="o", color=pal[method], label=method)
                label(ax, key if isinstance(key, tuple) else (key,), metric, d)
        figures.shared_legend(fig, [handles[m] for m in methods if m in handles], [m for m in methods if m in handles],
                              "method (shaded: 95% CI)")
    return figures.save(fig, out_dir, name)


def sensitivity_curves(summary: pd.DataFrame, out_dir: Path, name: str = "sensitivity_vs_eps",
                       pal: dict | None = None) -> list[Path]:
    """Mean metric vs ε per method with bootstrap CI bands; rows = settings, columns = metrics."""
    metrics = [m for m in figures.SENS_METRICS if m in set(summary["metric"])]

    def label(ax, key, metric, _d) -> None:
        ax.set(xlabel="ε", ylabel=f"mean {figures.SENS_METRICS[metric]}", title=" · ".join(map(str, key)))

    return band_grid(summary, figures.SETTING, metrics, "eps", out_dir, name, label, width=4.0, height=3.2, pal=pal)
