"""Gather clip-xai run dirs into one tidy frame and write figures, tables and index.md (`clip-xai-report`)."""
from clip_xai.report.collect import Collection, find_runs, flatten
from clip_xai.report.index import Report, make_report

__all__ = ["Collection", "Report", "find_runs", "flatten", "make_report"]
