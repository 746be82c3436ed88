"""Provenance (clip_xai.provenance): what each run records about the code and packages that made it,
and the report's warning when the runs of one report were made by different ones."""
from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from clip_xai import provenance
from clip_xai.report.index import make_report
from tests.helpers import REPO, run_cli
from tests.test_report import cfg, sens_rows, write_run


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True).stdout.strip()


def _checkout(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\nversion = '9.8.7'\n")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return root


def test_git_state_commit_and_dirty_flag(tmp_path):
    root = _checkout(tmp_path)
    head = _git(root, "rev-parse", "HEAD")
    assert provenance.git_state(root) == {"commit": head, "dirty": False}
    (root / "untracked.txt").write_text("results are not code\n")
    assert provenance.git_state(root)["dirty"] is False  # untracked files do not count
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\nversion = '9.8.8'\n")
    assert provenance.git_state(root) == {"commit": head, "dirty": True}
    assert provenance.git_state(tmp_path) is None  # not a checkout: no record, no error
    assert provenance._checkout_version(root) == "9.8.8"


def test_lock_hash_and_mismatches(tmp_path):
    root = _checkout(tmp_path)
    assert provenance.lock_state(root) is None  # a checkout without a lock for this Python
    lock = provenance.lock_path(root)
    lock.parent.mkdir()
    numpy = metadata.version("numpy")
    text = (f"numpy=={numpy} \\\n    --hash=sha256:{'0' * 64}\n    # via x\n"
            "Torch==0.0.1 \\\n    --hash=sha256:1\nnot-installed-pkg[extra]==1.2\n")
    lock.write_text(text)
    state = provenance.lock_state(root)
    assert state["file"] == f"requirements/lock-py{sys.version_info[0]}.{sys.version_info[1]}.txt"
    assert state["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert state["mismatches"] == {"torch": {"locked": "0.0.1", "installed": metadata.version("torch")},
                                   "not-installed-pkg": {"locked": "1.2", "installed": None}}
    assert provenance.lock_state(tmp_path / "nowhere") is None


def test_the_repository_lock_is_the_installed_environment_when_built_by_make_install():
    """In a checkout the record names the committed lock; its pins parse (one per package)."""
    state = provenance.lock_state(REPO)
    if state is None:
        pytest.skip(f"no committed lock for Python {sys.version_info[0]}.{sys.version_info[1]}")
    pins = provenance.locked_versions(provenance.lock_path(REPO).read_text())
    assert {"torch", "transformers", "open-clip-torch", "timm", "numpy", "hydra-core", "wandb"} <= set(pins)
    assert pins["torch"] == "2.14.1" and set(state["mismatches"]) <= set(pins)


def _env(**packages) -> dict:
    env = {"clip_xai": "0.1.0", "git": {"commit": "a" * 40, "dirty": False}, "python": "3.11.7",
           "lock": {"file": "requirements/lock-py3.11.txt", "sha256": "f" * 64, "mismatches": {}},
           "packages": {"torch": "2.14.1", "transformers": "5.25.0", "numpy": "2.4.6"}}
    env["packages"].update(packages)
    return env


def test_differences_name_each_field_and_its_runs():
    same = provenance.differences({"r1": _env(), "r2": _env()})
    assert same == {}
    other = copy.deepcopy(_env(transformers="5.26.0"))
    other["git"] = {"commit": "b" * 40, "dirty": True}
    diff = provenance.differences({"r1": _env(), "r2": other, "r3": None})
    assert set(diff) == {"commit", "dirty", "transformers", "torch", "numpy", "python", "clip_xai", "lock sha256"}
    assert diff["transformers"] == {"5.25.0": ["r1"], "5.26.0": ["r2"], "unknown": ["r3"]}
    assert diff["commit"]["b" * 40] == ["r2"]


def _two_runs(root: Path, second: dict) -> list[Path]:
    runs = []
    for job, (env, method) in enumerate(((_env(), "gradcam"), (second, "rise"))):
        run = root / "sweep" / str(job)
        write_run(run, cfg("sensitivity", {"name": method}, 0.01), sens_rows(method, 0.01, job))
        (run / provenance.ENVIRONMENT_FILE).write_text(json.dumps(env))
        runs.append(run)
    return runs


def test_report_warns_when_runs_differ_in_versions(tmp_path):
    _two_runs(tmp_path / "a", _env(transformers="5.26.0"))
    index = make_report([tmp_path / "a"], out=tmp_path / "a_out", n_boot=10).index.read_text()
    env = index[index.index("## Environment"):index.index("## Data")]
    assert "**warning: the runs differ in transformers**" in env
    assert "`5.25.0` (1 run: `0`)" in env and "`5.26.0` (1 run: `1`)" in env
    assert f"commit `{'a' * 40}`" in env and "torch `2.14.1`" in env  # what they share is shown once

    _two_runs(tmp_path / "b", _env())
    index = make_report([tmp_path / "b"], out=tmp_path / "b_out", n_boot=10).index.read_text()
    env = index[index.index("## Environment"):index.index("## Data")]
    assert "warning" not in env and "common to all 2 runs" in env and "transformers `5.25.0`" in env


@pytest.mark.slow
def test_tiny_run_records_commit_and_versions_everywhere(tmp_path):
    """A real run from this checkout: environment.json names the commit and the package versions;
    summary.json and the W&B run (offline) carry the same record."""
    res = run_cli(["model=tiny", "dataset.limit=2", "explainer=gradcam", "logger=wandb", "logger.log_images=0",
                   f"output_root={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = sorted(p.parent for p in tmp_path.rglob("environment.json"))
    env = json.loads((run / "environment.json").read_text())
    head = _git(REPO, "rev-parse", "HEAD")
    assert env["git"]["commit"] == head and isinstance(env["git"]["dirty"], bool)
    for name in ("torch", "torchvision", "open_clip_torch", "transformers", "numpy", "hydra-core", "wandb"):
        assert env["packages"][name] == metadata.version(name), name
    assert env["python"] == ".".join(map(str, sys.version_info[:3])) and env["clip_xai"]
    lock = provenance.lock_path(REPO)
    if lock.is_file():
        assert env["lock"]["sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()
    assert json.loads((run / "summary.json").read_text())["environment"] == env
    (wb,) = list((run / "wandb").glob("offline-run-*"))
    log = next(wb.glob("run-*.wandb")).read_bytes()
    assert head.encode() in log and env["packages"]["transformers"].encode() in log
