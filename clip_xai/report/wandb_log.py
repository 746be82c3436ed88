"""Log a finished report (figures, tables, the report dir as an artifact) to W&B as one run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from clip_xai.errors import ClipXaiError


def log_report(out_dir: Path, figures: list[Path], tables: list[Path], summary: dict[str, Any],
               mode: str = "offline", project: str | None = None, config: dict[str, Any] | None = None,
               entity: str | None = None, group: str | None = None) -> None:
    """One W&B run (job_type="report", in the sweep's ``group`` so the workspace view shows it beside
    the runs): PNG figures as images, CSV tables as tables (``figures/<stem>``, ``tables/<stem>``:
    the keys the view's panels read); always finishes."""
    try:
        import wandb
    except ImportError as e:
        raise ClipXaiError("--wandb was given but the wandb package is not installed",
                           "pip install wandb, or drop --wandb") from e
    try:
        run = wandb.init(project=project or "clip_xai", entity=entity, group=group, job_type="report", mode=mode,
                         dir=str(out_dir), config=config or {})
        logged: dict[str, Any] = {}
        for p in figures:
            if p.suffix == ".png":
                logged[f"figures/{p.stem}"] = wandb.Image(str(p))
        for p in tables:
            if p.suffix == ".csv":
                logged[f"tables/{p.stem}"] = wandb.Table(dataframe=pd.read_csv(p))
        run.log(logged)
        for k, v in summary.items():
            run.summary[k] = v
        art = wandb.Artifact("clip_xai-report", type="report")
        for p in [*figures, *tables, out_dir / "index.md", out_dir / "wandb_view.json"]:
            if p.is_file():
                art.add_file(str(p), name=str(p.relative_to(out_dir)))
        run.log_artifact(art)
    finally:
        wandb.finish()
