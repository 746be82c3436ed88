"""What produced a result: code version, packages, lock and hardware, recorded with every run.

:func:`environment` is written to each run directory as ``environment.json`` (by the entrypoint),
copied into ``summary.json`` and the W&B run config (by the sinks), and compared across the runs
of one report (:func:`differences`), which warns when they were made by different code or packages.

Fields:

* ``clip_xai``: the installed package version; ``python``, ``platform``.
* ``git``: ``{"commit", "dirty"}`` when the package is imported from a git checkout (``dirty``:
  tracked files differ from the commit; untracked files do not count), else ``None`` (an installed
  wheel, or no ``git`` program): never an error.
* ``packages``: versions (``importlib.metadata``) of :data:`PACKAGES`; ``None`` for one not installed.
* ``lock``: in a checkout, ``{"file", "sha256", "mismatches"}`` for the committed lock of the running
  Python (``requirements/lock-py3.X.txt`` at the repository root); ``mismatches`` lists the locked
  packages whose installed version differs (empty = the environment is exactly the lock, as
  ``make install`` builds it). The lock is not shipped in the wheel or sdist: an installed package
  resolves its own versions, so ``lock`` is ``None`` there and ``packages`` is the record.
* ``cuda``, ``gpu``: torch's CUDA version and the first GPU's name (``None`` on CPU).
"""
from __future__ import annotations

import hashlib
import json
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ENVIRONMENT_FILE = "environment.json"

#: Packages whose versions every run records (the adapters re-run the internals of the first five).
PACKAGES = ("torch", "torchvision", "open_clip_torch", "transformers", "timm", "numpy", "scipy", "pandas",
            "hydra-core", "omegaconf", "wandb", "torchmetrics", "scikit-image")

#: The repository root when clip_xai is imported from a checkout (the folder above the package).
ROOT = Path(__file__).resolve().parents[1]


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    return {name: version(name) for name in packages}


def git_state(root: Path = ROOT) -> dict | None:
    """``{"commit", "dirty"}`` of the checkout at ``root``; ``None`` outside one or without git."""
    if not (root / ".git").exists() or not (root / "pyproject.toml").is_file():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=20)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode or status.returncode:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def lock_path(root: Path = ROOT) -> Path:
    """The committed lock of the running Python in the checkout at ``root``."""
    return root / "requirements" / f"lock-py{sys.version_info[0]}.{sys.version_info[1]}.txt"


def locked_versions(text: str) -> dict[str, str]:
    """``name==version`` pins of a lock file, names normalised (PEP 503)."""
    return {_normalise(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)",
                                                         text, re.MULTILINE)}


def lock_state(root: Path = ROOT) -> dict | None:
    """``{"file", "sha256", "mismatches"}`` of the checkout's lock; ``None`` when there is none."""
    path = lock_path(root)
    if not (root / "pyproject.toml").is_file():  # an installed package, not a checkout
        return None
    if not path.is_file():
        return None
    data = path.read_bytes()
    mismatches = {}
    for name, pinned in locked_versions(data.decode()).items():
        installed = version(name)
        if installed != pinned:
            mismatches[name] = {"locked": pinned, "installed": installed}
    return {"file": str(path.relative_to(root)), "sha256": hashlib.sha256(data).hexdigest(),
            "mismatches": mismatches}


def environment() -> dict:
    """Everything :mod:`clip_xai.provenance` records about the running process (see the module doc)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "clip_xai": version("clip_xai") or _checkout_version(),
        "git": git_state(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "lock": lock_state(),
        "torch": torch.__version__,  # the build tag too (e.g. +cu128), which metadata may lack
        "cuda": torch.version.cuda,
        "gpu": gpu,
    }


def write_environment(run_dir: Path) -> dict:
    env = environment()
    (Path(run_dir) / ENVIRONMENT_FILE).write_text(json.dumps(env, indent=2))
    return env


def read_environment(run_dir: Path) -> dict | None:
    """The run's recorded environment, ``None`` for runs made before it was recorded."""
    path = Path(run_dir) / ENVIRONMENT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def fingerprint(env: dict | None) -> dict[str, str | None]:
    """The fields that must agree between runs compared in one report: commit, dirty flag, lock
    hash and every package version (flat ``{field: value}``)."""
    if not env:
        return {}
    git = env.get("git") or {}
    lock = env.get("lock") or {}
    flat = {"commit": git.get("commit"), "dirty": str(git.get("dirty")) if git else None,
            "lock sha256": lock.get("sha256"), "python": env.get("python"), "clip_xai": env.get("clip_xai")}
    flat.update({name: v for name, v in (env.get("packages") or {}).items()})
    return flat


def differences(envs: dict[str, dict | None]) -> dict[str, dict[str, list[str]]]:
    """``{field: {value: [run, ...]}}`` for every fingerprint field on which the runs disagree.

    ``envs`` maps a run name to its recorded environment; runs without one count as ``unknown``.
    """
    prints = {run: fingerprint(env) for run, env in envs.items()}
    fields = sorted({f for p in prints.values() for f in p})
    out: dict[str, dict[str, list[str]]] = {}
    for field in fields:
        by_value: dict[str, list[str]] = {}
        for run, p in prints.items():
            by_value.setdefault(str(p.get(field, "unknown")), []).append(run)
        if len(by_value) > 1:
            out[field] = by_value
    return out


def _checkout_version(root: Path = ROOT) -> str | None:
    """pyproject's version when clip_xai runs from a checkout that is not installed (PYTHONPATH)."""
    import tomllib

    path = root / "pyproject.toml"
    if not path.is_file():
        return None
    return tomllib.loads(path.read_text()).get("project", {}).get("version")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def report_lines(runs: list[Path]) -> list[str]:
    """Markdown lines for a report's index: the environment the runs were made in, and a warning
    naming every field (commit, dirty flag, lock hash, package versions) on which they differ."""
    envs = {str(run): read_environment(run) for run in runs}
    known = [e for e in envs.values() if e]
    lines = ["## Environment", ""]
    if not known:
        return lines + [f"- none of the {len(runs)} runs recorded its environment (`{ENVIRONMENT_FILE}`)", ""]
    first = fingerprint(known[0])
    diff = differences(envs)
    shown = ["commit", "dirty", "lock sha256", "clip_xai", "python", "torch", "torchvision", "open_clip_torch",
             "transformers", "timm", "numpy", "hydra-core", "wandb"]
    same = [f"{k} `{first.get(k)}`" for k in shown if k not in diff]
    lines.append(f"- common to all {len(runs)} runs: " + (", ".join(same) if same else "(nothing)"))
    missing = sum(1 for e in envs.values() if not e)
    if missing:
        lines.append(f"- {missing} run(s) recorded no `{ENVIRONMENT_FILE}` (made before provenance was recorded)")
    if diff:
        lines.append(f"- **warning: the runs differ in {', '.join(diff)}**; their results may not be comparable:")
        for field_name, by_value in diff.items():
            parts = [f"`{value}` ({len(names)} run{'s' if len(names) > 1 else ''}: "
                     f"{', '.join(f'`{Path(n).name}`' for n in names[:3])}{', …' if len(names) > 3 else ''})"
                     for value, names in by_value.items()]
            lines.append(f"  - {field_name}: " + "; ".join(parts))
    return lines + [""]
