"""docs/tutorial.md runs top to bottom as a notebook (jupytext → nbclient), so it cannot rot.

The kernel is ``python3``, which jupyter_client starts with the current interpreter, so the
notebook sees the same clip_xai as the tests.
"""
from __future__ import annotations

import os
import time

import pytest

from tests.helpers import REPO

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

TUTORIAL = REPO / "docs" / "tutorial.md"


@pytest.mark.slow
def test_tutorial_runs(tmp_path, monkeypatch):
    """Slow by design (about 30 s): it is the user's path, so it keeps the tutorial's own processes:
    a fresh kernel, then the documented ``python -m clip_xai -m`` sweep and ``python -m clip_xai.report``
    as the reader types them (three interpreters that each import torch and clip_xai)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as tests.helpers.run_cli: one thread per process on a shared CPU
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    nb = jupytext.read(TUTORIAL)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 10
    start = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    print(f"tutorial: {time.perf_counter() - start:.1f} s")
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    figures = [c for c in code if any("image/png" in o.get("data", {}) for o in c.outputs)]
    assert len(figures) == 3  # the three show() cells drew their figures
    last = code[-1].outputs[-1]["data"]["text/plain"]
    assert "api" in last and "cli" in last
