"""Bad settings through the real entrypoint (in-process ``clip_xai.__main__.main``): each ends in
exit code 2, exactly one ``error:`` line (plus its ``fix:`` line), no traceback, and nothing of the
project's written (no config.yaml, environment.json or results). Hydra's own bookkeeping (the job's
``.hydra/`` folder and log file, made before the task starts) is not the project's and not checked.

Also: every shipped experiment file passes the same validation (so the checks refuse no valid run).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from clip_xai.config import validate
from clip_xai.paths import CONF_DIR
from tests.helpers import compose_cfg

BASE = ["model=tiny", "logger=none", "dataset.limit=2", "device=cpu"]

# (overrides, a piece of the error line)
BAD = [
    (["batch_size=0"], "batch_size=0"),
    (["batch_size=-3"], "batch_size=-3"),
    (["batch_size=abc"], "batch_size='abc'"),
    (["batch_size=2.5"], "batch_size=2.5"),
    (["seed=abc"], "seed='abc'"),
    (["seed=-1"], "seed=-1"),
    (["seed=1.5"], "seed=1.5"),
    (["num_workers=-1"], "num_workers=-1"),
    (["num_workers=many"], "num_workers='many'"),
    (["save_examples=-1"], "save_examples=-1"),
    (["cache=maybe"], "cache='maybe'"),
    (["name=a/b"], "name='a/b'"),
    (["precision=fp64"], "precision='fp64'"),
    (["device=tpu"], "device='tpu'"),
    (["metrics.k=100000"], "metrics.k=100000 is larger than the map"),
    (["metrics.k=0"], "metrics.k=0"),
    (["metrics.k=ten"], "metrics.k='ten'"),
    (["metrics.ssim_chunk=1.5"], "metrics.ssim_chunk=1.5"),
    (["metrics.ssim_chunk=0"], "ssim_chunk must be >= 1"),
    (["study=randomisation", "metrics.text_k=0"], "metrics.text_k=0"),
    (["study=randomisation", "study.modes=[sideways]"], "unknown randomisation modes"),
    (["study=randomisation", "study.tower=both"], "unknown tower"),
    (["dataset.limit=0"], "dataset.limit=0"),
    (["dataset.limit=two"], "dataset.limit='two'"),
    (["dataset.on_long_caption=shout"], "shout"),
    (["perturbation.eps=2"], "eps=2"),
    (["perturbation.eps=big"], "perturbation.eps='big'"),
    (["perturbation=pgd", "perturbation.steps=2.5"], "perturbation.steps=2.5"),
    (["explainer=rise", "explainer.n_masks=many"], "explainer.n_masks='many'"),
    (["logger=wandb", "logger.mode=loud"], "logger.mode='loud'"),
    (["logger=wandb", "logger.log_images=-1"], "logger.log_images=-1"),
    (["model.arch=nope"], "nope"),
]


def _project_files(root: Path) -> list[Path]:
    """Files under ``root`` other than Hydra's own (the ``.hydra/`` folder and the job log)."""
    return [p for p in root.rglob("*") if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"]


@pytest.mark.parametrize("overrides,needle", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_setting_is_one_clear_error_and_writes_nothing(overrides, needle, tmp_path, monkeypatch, capsys):
    from clip_xai.__main__ import main

    monkeypatch.setattr(sys, "argv", ["clip_xai", *BASE, *overrides, f"output_root={tmp_path}"])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err and "Error executing job" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "fix:" in err
    assert not _project_files(tmp_path), _project_files(tmp_path)


EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_shipped_experiments_pass_validation(experiment):
    validate(compose_cfg([f"experiment={experiment}"]), CONF_DIR)


@pytest.mark.parametrize("group,option", [(g.name, f.stem) for g in sorted(Path(CONF_DIR).iterdir()) if g.is_dir()
                                          and g.name not in ("hydra", "experiment") for f in sorted(g.glob("*.yaml"))])
def test_every_shipped_option_passes_validation(group, option):
    validate(compose_cfg(["model=tiny", f"{group}={option}"]), CONF_DIR)
