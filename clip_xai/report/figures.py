"""Report figures (seaborn on matplotlib's Agg canvas), each saved as PNG and PDF."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from clip_xai.errors import ClipXaiError
from clip_xai.report import palette

SENS_METRICS = {"spearman": "Spearman ρ", "ssim": "SSIM", "topk": "Top-K intersection"}
SETTING = ["dataset", "model", "perturbation"]
HEXBIN_ABOVE = 4000  # points per panel above which the Δs plot switches from scatter to hexbin


def _figure(nrows: int, ncols: int, w: float, h: float, **kw: Any) -> tuple[Figure, np.ndarray]:
    """A Figure on an Agg canvas (no pyplot state) and its 2-D axes grid."""
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def save(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    """Write `<name>.png` and `<name>.pdf` into out_dir; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    return paths


def slug(*parts: Any) -> str:
    """File-name-safe join of parts."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(str(p) for p in parts)).strip("-")


def method_colours(methods: list[str], pal: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report's method -> colour mapping (:mod:`clip_xai.report.palette`), or one built from
    ``methods`` alone when a figure is drawn outside a report."""
    if pal is not None and all(m in pal for m in methods):
        return pal
    return palette.palette([*methods, *(pal or {})])


LEGEND_CHAR_IN = 0.055  # width of one legend character at fontsize 7, inches (a generous estimate)
LEGEND_ROW_IN = 0.17  # height of one legend row at fontsize 7, inches


def shared_legend(fig: Figure, handles: list, labels: list[str], title: str) -> None:
    """One legend for the whole figure, below the grid of panels (outside every axes: the
    constrained layout makes room for it), deduplicated by label, in the order given. As many
    columns as the figure's width holds; the figure grows by the legend's height (and widens
    when one column does not fit), so the panels keep their size whatever the number of entries."""
    by_label = dict(zip(labels, handles))
    if not by_label:
        return
    col_w = 0.45 + LEGEND_CHAR_IN * max(len(s) for s in by_label)
    width = max(fig.get_figwidth(), col_w + 0.3)
    ncols = max(1, min(len(by_label), int(width * 0.95 // col_w)))
    rows = -(-len(by_label) // ncols)
    fig.set_size_inches(width, fig.get_figheight() + rows * LEGEND_ROW_IN + 0.4)
    fig.legend(list(by_label.values()), list(by_label), loc="outside lower center", ncols=ncols, fontsize=7,
               title=title, title_fontsize=7, frameon=False)


def metric_vs_simdiff(sens: pd.DataFrame, metric: str, out_dir: Path, seed: int = 0) -> list[Path]:
    """Metric vs Δs (sim_diff), one panel per method; scatter coloured by ε, hexbin when dense."""
    methods = sorted(sens["method"].unique())
    ncols = min(4, len(methods))
    nrows = -(-len(methods) // ncols)
    eps_levels = [f"{e:g}" for e in sorted(sens["eps"].dropna().unique())]
    pal = dict(zip(eps_levels, sns.color_palette("viridis", len(eps_levels))))
    with sns.axes_style("whitegrid"):
        fig, axes = _figure(nrows, ncols, 3.4, 3.0, sharex=True, sharey=True)
        for ax in axes.flat[len(methods):]:
            ax.set_visible(False)
        for k, (ax, method) in enumerate(zip(axes.flat, methods)):
            d = sens.loc[sens["method"] == method, ["sim_diff", metric, "eps"]].dropna(subset=["sim_diff", metric])
            if len(d) > HEXBIN_ABOVE:
                ax.hexbin(d["sim_diff"], d[metric], gridsize=40, mincnt=1, cmap="viridis", bins="log")
            elif len(d):
                d = d.assign(eps=d["eps"].map(lambda e: f"{e:g}"))
                d = d.sample(frac=1.0, random_state=seed)  # no ε drawn systematically on top
                sns.scatterplot(data=d, x="sim_diff", y=metric, hue="eps", hue_order=eps_levels, palette=pal,
                                s=9, alpha=0.5, linewidth=0, ax=ax, legend=(k == 0))
            ax.axvline(0, color="0.5", linewidth=0.8)
            ax.set(title=f"{method} (n={len(d)})", xlabel="Δs (relative similarity change)",
                   ylabel=SENS_METRICS[metric])
        legend = axes[0, 0].get_legend()
        if legend is not None:  # one ε legend for all panels, under the grid
            handles, labels = legend.legend_handles, [t.get_text() for t in legend.get_texts()]
            legend.remove()
            shared_legend(fig, handles, labels, "ε")
        return save(fig, out_dir, f"{metric}_vs_simdiff")


def qualitative_grid(examples: list[dict[str, Any]], out_dir: Path, name: str, eps: float | None = None,
                     n_samples: int = 4) -> tuple[list[Path], float] | None:
    """Rows = samples × (clean, perturbed), columns = methods: map overlays at one ε (smallest by default)."""
    available = sorted({e["eps"] for e in examples})
    if not available:
        return None
    if eps is None:
        eps = available[0]
    elif not any(np.isclose(eps, a) for a in available):
        raise ClipXaiError(f"no examples.npz at ε={eps:g} (available: {', '.join(f'{a:g}' for a in available)})",
                           "pass --grid-eps with one of the available values, or leave it out for the smallest")
    chosen: dict[str, dict[str, Any]] = {}
    for e in examples:
        if np.isclose(e["eps"], eps) and e["method"] not in chosen:
            with np.load(e["path"], allow_pickle=False) as z:
                chosen[e["method"]] = {k: z[k] for k in ["sample_id", "image", "map_clean", "image_pert", "map_pert"]}
                chosen[e["method"]]["caption"] = z["caption"] if "caption" in z.files else None
    methods = sorted(chosen)
    cover: dict[str, int] = {}
    for m in methods:
        for sid in chosen[m]["sample_id"]:
            cover[str(sid)] = cover.get(str(sid), 0) + 1
    samples = sorted(cover, key=lambda s: -cover[s])[:n_samples]  # stable: keeps first-seen order on ties
    fig, axes = _figure(2 * len(samples), len(methods), 1.9, 1.9)
    for j, m in enumerate(methods):
        ex = chosen[m]
        ids = [str(s) for s in ex["sample_id"]]
        for i, sid in enumerate(samples):
            for r, (img_key, map_key) in enumerate([("image", "map_clean"), ("image_pert", "map_pert")]):
                ax = axes[2 * i + r, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if sid in ids:
                    k = ids.index(sid)
                    img = ex[img_key][k]
                    h, w = img.shape[:2]
                    ax.imshow(img, extent=(0, w, h, 0))
                    ax.imshow(ex[map_key][k].astype(np.float32), cmap="jet", alpha=0.5, vmin=0, vmax=1,
                              extent=(0, w, h, 0), interpolation="bilinear")
                else:
                    ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
                if i == 0 and r == 0:
                    ax.set_title(m, fontsize=8)
                if j == 0:
                    cap = _caption(chosen, sid)
                    ax.set_ylabel(f"{sid}\n{cap}\nclean" if r == 0 else f"{sid}\nε={eps:g}", fontsize=6)
    return save(fig, out_dir, name), float(eps)


def _caption(chosen: dict[str, dict[str, Any]], sid: str) -> str:
    """The sample's caption (shortened) from whichever method's examples carry it."""
    for ex in chosen.values():
        ids = [str(s) for s in ex["sample_id"]]
        if ex["caption"] is not None and sid in ids:
            c = str(ex["caption"][ids.index(sid)])
            return c if len(c) <= 28 else c[:26] + "…"
    return ""
