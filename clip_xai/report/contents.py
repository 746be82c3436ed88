"""What a report holds: its figures and tables (:class:`Item`) and the record of what was written and
skipped (:class:`Report`).

Kept below ``index.py`` and the study sections (``localisation.py``, ``randomisation.py``,
``controls.py``) so that the sections can add items without importing the module that calls them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clip_xai.report.collect import Collection


@dataclass
class Item:
    """One figure or table of the report: its files and a one-line description."""

    title: str
    paths: list[Path]
    what: str


@dataclass
class Report:
    """What make_report wrote and why anything was left out."""

    out_dir: Path
    index: Path
    collection: Collection
    figures: list[Item] = field(default_factory=list)
    tables: list[Item] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    palette: dict = field(default_factory=dict)
    view_file: Path | None = None  # wandb_view.json, when --wandb wrote the W&B view's definition
    overview: str = ""  # the overview section's Markdown (report/overview.py), first in index.md  # method -> colour, the same in every figure (report/palette.py)

    def files(self) -> list[Path]:
        """Every figure and table file written."""
        return [p for it in [*self.figures, *self.tables] for p in it.paths]
