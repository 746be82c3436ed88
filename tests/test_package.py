"""The package as a user gets it: a wheel built by ``python -m build`` runs from any directory.

The slow tests build the sdist and, from it, the wheel (as ``python -m build`` does), install
the wheel with ``--no-deps`` into a temporary target next to this environment's dependencies,
and run the console scripts from a temporary directory with only that target (and the user's
own code) on ``PYTHONPATH``, so nothing can come from the repository checkout.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

import build_hooks
from tests.helpers import REPO

SCRIPTS = {"clip-xai", "clip-xai-report", "clip-xai-bench"}
# What the sdist is made from: everything MANIFEST.in and pyproject.toml name.
SOURCES = ["pyproject.toml", "README.md", "MANIFEST.in", "build_hooks.py", "clip_xai", "conf", "experiments"]

# The docs' example (docs/extending.md) of a user's own config dir: a new explainer whose class lives in the
# user's code, an option extending a packaged one, and an experiment of their own.
USER_CODE = '''
"""Gradient x input (Shrikumar et al. 2016, arXiv:1605.01713): |x * d cos(f_I(x), f_T(t)) / dx|."""
from clip_xai.explainers.base import Explainer, pixel_gradient, text_target


class GradTimesInput(Explainer):
    def explain_image(self, model, pixels, tokens, seeds):
        g, _ = pixel_gradient(model, pixels, text_target(model, tokens))
        return (g * pixels).abs().sum(1)  # (B, H, W), pixel space
'''
USER_CONF = {
    "explainer/gxi.yaml": "_target_: my_explainers.GradTimesInput\nname: gxi\nmodality: image\n",
    "explainer/gradcam_l6.yaml": "defaults: [gradcam, _self_]\nname: gradcam_l6\nlayer: 6\n",
    "experiment/my_sweep.yaml": textwrap.dedent("""\
        # @package _global_
        defaults:
          - override /model: tiny
          - override /logger: none
        name: my_sweep
        dataset:
          limit: 1
        hydra:
          sweeper:
            params:
              explainer: gradcam,gxi
        """),
}


def package_yaml() -> dict[str, Path]:
    """Every YAML the wheel must hold, ``clip_xai/conf/...`` -> its one source in git."""
    out = {f"clip_xai/conf/{p.relative_to(REPO / 'conf').as_posix()}": p for p in (REPO / "conf").rglob("*.yaml")
           if p.relative_to(REPO / "conf").parts[0] != "experiment"}
    out.update({f"clip_xai/conf/experiment/{p.name}": p for p in (REPO / "experiments").glob("*.yaml")})
    return out


def test_build_hook_maps_conf_and_experiments():
    got = {f"clip_xai/conf/{dest.as_posix()}": src for dest, src in build_hooks.conf_files(REPO).items()}
    assert got == package_yaml()
    assert len(list((REPO / "experiments").glob("*.yaml"))) == len([k for k in got if "/experiment/" in k]) > 0


def test_build_hook_refuses_a_tree_without_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        build_hooks.conf_files(tmp_path)


def test_missing_configs_is_one_clear_error(tmp_path, monkeypatch, capsys):
    import clip_xai.__main__ as entry

    monkeypatch.setattr(entry, "CONF_DIR", str(tmp_path / "conf"))
    with pytest.raises(SystemExit) as exc:
        entry.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and "fix: install a wheel or sdist made by `python -m build`" in err


def test_checkout_reads_the_repository_conf():
    from clip_xai.paths import CONF_DIR

    assert Path(CONF_DIR) == REPO / "conf"
    assert not (REPO / "clip_xai" / "conf").exists(), "the build must not write configs into the source tree"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Build sdist + wheel from a copy of the sources, pip-install the wheel into a target dir."""
    root = tmp_path_factory.mktemp("pkg")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    dist = root / "dist"
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,), (sdist,) = dist.glob("*.whl"), dist.glob("*.tar.gz")
    target = root / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-index",
                           "--no-deps", "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    user = root / "user"  # the user's own code and config dir, outside the package
    (user / "code").mkdir(parents=True)
    (user / "code" / "my_explainers.py").write_text(USER_CODE)
    for rel, text in USER_CONF.items():
        (user / "myconf" / rel).parent.mkdir(parents=True, exist_ok=True)
        (user / "myconf" / rel).write_text(text)
    work = root / "work"  # the directory the user runs in: no clip_xai, no conf/
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(user / "code")]), "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return {"wheel": wheel, "sdist": sdist, "target": target, "user": user, "work": work, "env": env}


def _run(installed, args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=installed["work"], env=installed["env"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_and_sdist_contents(installed):
    with zipfile.ZipFile(installed["wheel"]) as whl:
        names = set(whl.namelist())
        for dest, src in package_yaml().items():  # the configs, byte for byte from their one source
            assert whl.read(dest) == src.read_bytes(), dest
        data = {p.relative_to(REPO).as_posix() for p in (REPO / "clip_xai").rglob("*")
                if p.is_file() and p.suffix not in (".py", ".pyc")}
        assert "clip_xai/models/configs/tiny.json" in data
        assert data <= names, f"data files missing from the wheel: {sorted(data - names)}"
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = {line.split("=")[0].strip() for line in whl.read(entry_points).decode().splitlines() if "=" in line}
    assert SCRIPTS <= scripts
    with tarfile.open(installed["sdist"]) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    assert {"build_hooks.py", "conf/config.yaml", "experiments/default.yaml"} <= members
    assert not any(m.startswith("conf/experiment") for m in members)  # experiments/ is the one copy
    assert all((installed["target"] / "bin" / s).is_file() for s in scripts)


@pytest.mark.slow
def test_wheel_composes_every_experiment_from_any_directory(installed):
    """In the installed package: every packaged experiment, and the user's own options via hydra.searchpath."""
    script = textwrap.dedent(f"""
        import json, sys
        from importlib.metadata import distribution
        from hydra import compose, initialize_config_dir
        import clip_xai
        from clip_xai.paths import CONF_DIR
        from clip_xai.config import register_resolvers
        from pathlib import Path
        register_resolvers()
        names = sorted(p.stem for p in Path(CONF_DIR, "experiment").glob("*.yaml"))
        user = ["hydra.searchpath=[file://{installed['user'] / 'myconf'}]"]
        models = {{}}
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            for exp in names:
                models[exp] = compose(config_name="config", overrides=[f"experiment={{exp}}"]).model.name
            mine = compose(config_name="config", overrides=user + ["experiment=my_sweep"])
            l6 = compose(config_name="config", overrides=user + ["explainer=gradcam_l6"]).explainer
        eps = [e for e in distribution("clip_xai").entry_points if e.group == "console_scripts"]
        loaded = {{e.name: callable(e.load()) for e in eps}}
        json.dump({{"file": clip_xai.__file__, "conf": CONF_DIR, "models": models, "mine": [mine.name, mine.model.name],
                   "l6": [l6.name, l6.layer, l6._target_], "scripts": loaded}}, sys.stdout)
    """)
    out = json.loads(_run(installed, [sys.executable, "-c", script]).stdout)
    target = str(installed["target"])
    assert out["file"].startswith(target) and out["conf"] == str(installed["target"] / "clip_xai" / "conf")
    assert sorted(out["models"]) == sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))
    assert all(out["models"].values())
    assert out["mine"] == ["my_sweep", "tiny"]
    assert out["l6"] == ["gradcam_l6", 6, "clip_xai.explainers.gradcam.GradCAM"]  # extends the packaged gradcam
    assert SCRIPTS <= set(out["scripts"]) and all(out["scripts"].values())


@pytest.mark.slow
def test_wheel_console_scripts_run_from_any_directory(installed):
    """clip-xai with a user config dir (a packaged and a user explainer), then report and bench,
    all writing to ./outputs of the directory they run in."""
    bin_, work = installed["target"] / "bin", installed["work"]
    _run(installed, [str(bin_ / "clip-xai"), "-m", "--config-dir", str(installed["user"] / "myconf"), "model=tiny",
                     "logger=none", "dataset.limit=1", "explainer=gradcam,gxi"])
    runs = {p.name: p for p in (work / "outputs" / "runs").iterdir() if p.is_dir()}
    assert set(runs) == {f"dataset.limit=1,explainer={e},model=tiny" for e in ("gradcam", "gxi")}
    for name, run_dir in runs.items():
        assert (run_dir / "DONE").is_file() and (run_dir / "results.parquet").is_file()
        hydra_cfg = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
        main = [s for s in hydra_cfg["runtime"]["config_sources"] if s["provider"] == "main"]
        assert main == [{"path": str(installed["target"] / "clip_xai" / "conf"), "schema": "file", "provider": "main"}]
    user_cfg = yaml.safe_load((runs["dataset.limit=1,explainer=gxi,model=tiny"] / "config.yaml").read_text())
    assert user_cfg["explainer"]["_target_"] == "my_explainers.GradTimesInput"
    rows = pd.read_parquet(runs["dataset.limit=1,explainer=gxi,model=tiny"] / "results.parquet")
    assert list(rows.explainer.unique()) == ["gxi"] and rows.map_flag.eq("").all()

    _run(installed, [str(bin_ / "clip-xai-report"), "outputs/runs", "--n-boot", "20"])
    frame = pd.read_parquet(work / "outputs" / "runs" / "report" / "results.parquet")
    assert sorted(frame.explainer.unique()) == ["gradcam", "gxi"]

    _run(installed, [str(bin_ / "clip-xai-bench"), "--explainers", "gradcam", "--batch-sizes", "1", "--repeats", "1"])
    bench = pd.read_csv(work / "outputs" / "bench" / "bench.csv")
    assert "gradcam" in set(bench.explainer)
