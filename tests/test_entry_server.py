"""The test helpers that run the entrypoint: run_cli through the fork server, module_run, timeouts.

Cheap: ``--cfg job`` prints the composed config and exits before any model is built.
"""
from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.helpers import EntryServer, module_run, run_cli

composed = module_run("--cfg", "job", "model=tiny", "explainer=rise", "explainer.n_masks=64")


def test_module_run_gives_the_run_and_its_output_root(composed):
    res, root = composed
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = yaml.safe_load(res.stdout)
    assert cfg["output_root"] == str(root) and root.is_dir()
    assert (cfg["model"]["name"], cfg["explainer"]["name"], cfg["explainer"]["n_masks"]) == ("tiny", "rise", 64)


def test_each_run_is_its_own_process_with_the_real_exit_status(tmp_path):
    bad = run_cli(["model=tiny", "explainer=nope", f"output_root={tmp_path}"])
    assert bad.returncode == 1 and "Could not find 'explainer/nope'" in bad.stderr  # Hydra's own exit
    assert bad.args[:3] == ["python", "-m", "clip_xai"]
    again = run_cli(["--cfg", "job", "model=tiny", f"output_root={tmp_path}"])  # the server survived it
    assert again.returncode == 0 and yaml.safe_load(again.stdout)["model"]["name"] == "tiny"


def test_a_run_past_its_timeout_is_killed_and_the_server_goes_on(tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        run_cli(["model=tiny", "dataset.limit=2", "logger=none", f"output_root={tmp_path}"], timeout=0.01)
    server = EntryServer.get()
    assert server.proc.poll() is None
    res = run_cli(["--cfg", "job", "model=tiny", f"output_root={tmp_path}"])
    assert res.returncode == 0 and EntryServer.get() is server
