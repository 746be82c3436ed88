"""Report section of the localisation study: method × metric table with bootstrap CIs, clean and
under each perturbation strength, and a figure of each metric against ε."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from clip_xai.report import stats, tables
from clip_xai.report.contents import Item, Report
from clip_xai.report.bands import band_grid
from clip_xai.schema import HIGHER_IS_BETTER, LOCALISATION_METRICS

COMPLEXITY = ["sparseness", "complexity"]
#: Segmentation metrics (Chefer et al. 2021's ImageNet-segmentation protocol) of the rows that carry
#: them; all higher-is-better (HIGHER_IS_BETTER wins where it lists them). Here per-sample means
#: with bootstrap CIs; the reference's pooled values are the localisation study's own summary.
SEG_METRICS = {"pixel_accuracy": True, "miou": True, "mean_ap": True}
LABELS = {"pointing_game": "Pointing game", "energy_pointing_game": "Energy PG (box)",
          "relevance_mass": "Relevance mass", "relevance_rank": "Relevance rank", "mask_auroc": "Mask AUROC",
          # segmentation (Chefer et al.): rows are per image; the paper's pooled mIoU (sums of intersections
          # and unions over images) is summary.json's, and metrics.localisation.pooled_segmentation computes it
          "pixel_accuracy": "Pixel accuracy", "miou": "mIoU (per-image mean)", "mean_ap": "mAP"}


def metrics_of(loc: pd.DataFrame) -> list[str]:
    """The localisation metrics of the table: the five of every run, the segmentation ones when present."""
    seg = [m for m in SEG_METRICS if m in loc.columns and loc[m].notna().any()]
    return list(dict.fromkeys([*(m for m in LOCALISATION_METRICS if m not in SEG_METRICS), *seg]))


SETTING = ["dataset", "model", "mask"]


def clean_rows(loc: pd.DataFrame) -> pd.DataFrame:
    """One row per (setting, method, sample): the clean columns repeat in every ε job of a sweep."""
    return loc.drop_duplicates([*SETTING, "method", "sample_id"], keep="first")


def pert_long(loc: pd.DataFrame) -> pd.DataFrame:
    """Rows of the perturbed maps with the ``*_pert`` columns renamed to the clean names."""
    p = loc[loc["eps"].notna()]
    clean = [m for m in [*metrics_of(loc), *COMPLEXITY] if m in p.columns]
    cols = {f"{m}_pert": m for m in clean if f"{m}_pert" in p.columns}
    p = p.drop(columns=clean).rename(columns=cols)
    return p.assign(**{m: np.nan for m in clean if m not in p.columns})  # no perturbed value: NaN, not the clean one


def summary_table(loc: pd.DataFrame, n_boot: int, seed: int) -> tuple[pd.DataFrame, str]:
    """Mean [95% CI] per setting × condition (clean, then each ε) × method, one column per metric."""
    metrics = [m for m in [*metrics_of(loc), *COMPLEXITY] if m in loc.columns]
    clean = clean_rows(loc).assign(condition="clean", eps=np.nan)
    parts = [stats.summarise(clean, metrics, [*SETTING, "condition", "eps", "method"], n_boot, seed)]
    pert = pert_long(loc)
    if len(pert):
        pert = pert.assign(condition=pert["perturbation"].astype(str))
        parts.append(stats.summarise(pert, metrics, [*SETTING, "condition", "eps", "method"], n_boot, seed))
    summary = pd.concat(parts, ignore_index=True)
    s = summary.copy()
    s["cell"] = tables.ci_cells(s["mean"], s["lo"], s["hi"])
    s["eps"] = s["eps"].map(tables.fmt_eps)
    idx = [*SETTING, "condition", "eps", "method"]
    wide = s.pivot_table(index=idx, columns="metric", values="cell", aggfunc="first", sort=False)
    wide = wide[[m for m in metrics if m in wide.columns]]
    wide.columns = [f"{LABELS.get(m, m)} {tables.ARROW[HIGHER_IS_BETTER.get(m, SEG_METRICS.get(m, True))]}"
                    for m in wide.columns]
    area = clean_rows(loc).groupby(SETTING, dropna=False)["mask_area"].mean()
    chance = "; ".join(f"{' · '.join(map(str, k))}: {v:.3f}" for k, v in area.items())
    note = (f"A uniform map scores the mean mask area on the pointing game, relevance mass and relevance rank "
            f"({chance}) and 0.5 on the mask AUROC. Rows flagged `empty_mask`, `no_mask` or with an unusable map "
            f"are left out (see counts).\n\n")
    return summary, note + tables.markdown(wide, index=True)


def curves(summary: pd.DataFrame, out_dir: Path, name: str = "localisation_vs_eps", pal: dict | None = None) -> list[Path]:
    """Each metric's mean and CI band against ε (clean at ε = 0), one curve per method."""
    d = summary[summary["metric"].isin([*LOCALISATION_METRICS, *SEG_METRICS])].copy()
    d["eps"] = d["eps"].fillna(0.0).astype(float)

    def label(ax, key, metric, _):
        ax.set_title(f"{LABELS[metric]}\n{' · '.join(map(str, key))}", fontsize=9)
        ax.set_xlabel("ε (0 = clean)")

    metrics = [m for m in [*LOCALISATION_METRICS, *SEG_METRICS] if m in set(d["metric"])]
    return band_grid(d, SETTING, metrics, "eps", out_dir, name, label, pal=pal)


def section(r: Report, loc: pd.DataFrame, n_boot: int, seed: int) -> None:
    """Add the localisation table and figure to report ``r`` ."""
    if not any(loc[m].notna().any() for m in LOCALISATION_METRICS):
        r.skipped.append("localisation table: every localisation row is NaN (see map_flag counts: empty_mask, no_mask)")
        return
    summary, md = summary_table(loc, n_boot, seed)
    r.tables.append(Item("Localisation", tables.write(summary, md, r.out_dir / "tables", "localisation",
                                                      "Localisation: mean [95% bootstrap CI]"),
                         f"pointing game, energy pointing game, relevance mass/rank accuracy, mask AUROC and "
                         f"complexity per method, clean and per ε, with 95% bootstrap CIs ({n_boot} resamples)"))
    r.figures.append(Item("Localisation vs ε", curves(summary, r.out_dir / "figures", pal=r.palette),
                          "each localisation metric against ε (0 = the clean map) per method, shaded 95% bootstrap CI"))
