"""Resolve pyproject.toml (dependencies + the ``test`` and ``docs`` extras) into one hashed lock
per supported Python for Linux x86_64: ``requirements/lock-py3.XX.txt``. Run by ``make lock``.

The resolver is ``uv pip compile`` (pinned in the Makefile, run from a scratch venv); installing
stays plain pip (``make install``: ``pip install --require-hashes -r lock``). Determinism: uv only
sees releases uploaded before ``--date`` (``--exclude-newer``), so rerunning with the same
pyproject and date writes the same files; a refresh moves the date (``make lock LOCK_DATE=...``).
The indexes are pip's own (PyPI plus this machine's ``extra-index-url``/``find-links`` from
``pip config``), so the wheels pip later takes from a local cache are the ones hashed here.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = ("3.11", "3.12", "3.13")
PLATFORM = "x86_64-manylinux_2_28"  # Linux x86_64, glibc >= 2.28 (torch's own wheel tag)
EXTRAS = ("test", "docs")


def pip_config(python: str) -> dict[str, list[str]]:
    """pip's configured index-url / extra-index-url / find-links (any scope), as lists."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    seen: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in ("index-url", "extra-index-url", "find-links"):
            values = shlex.split(value.strip().strip("'\""))
            seen.setdefault(name, [])
            seen[name] += [v for v in values if v not in seen[name]]
    return seen


def index_args(cfg: dict[str, list[str]]) -> list[str]:
    args = ["--index-url", (cfg.get("index-url") or ["https://pypi.org/simple"])[0]]
    for url in cfg.get("extra-index-url", []):
        args += ["--extra-index-url", url]
    for link in cfg.get("find-links", []):
        args += ["--find-links", link]
    # Take each version from whichever index has it (pip's behaviour), not from the first index only.
    return args + ["--index-strategy", "unsafe-best-match"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uv", required=True, help="path of the uv executable")
    parser.add_argument("--date", required=True, help="newest upload time considered, e.g. 2026-12-06T00:00:00Z")
    parser.add_argument("--pythons", nargs="+", default=list(PYTHONS))
    args = parser.parse_args()
    indexes = index_args(pip_config(sys.executable))
    with tempfile.TemporaryDirectory(prefix="clip_xai_lock_") as tmp:
        for version in args.pythons:
            # A fresh output file each time: uv reads an existing output as preferences, which makes
            # the result depend on the previous lock (and with --exclude-newer it can then pick a
            # local copy of torch that has no upload time and fail). Resolve from scratch instead.
            fresh = Path(tmp) / f"lock-py{version}.txt"
            cmd = [args.uv, "pip", "compile", "pyproject.toml", *(f"--extra={e}" for e in EXTRAS),
                   "--python-version", version, "--python-platform", PLATFORM, "--generate-hashes",
                   "--exclude-newer", args.date, "--custom-compile-command", "make lock", "--quiet",
                   "--no-cache", "-o", str(fresh), *indexes]
            subprocess.run(cmd, cwd=ROOT, check=True)
            out = ROOT / "requirements" / fresh.name
            shutil.copyfile(fresh, out)  # only after every earlier version resolved
            print(f"{out.relative_to(ROOT)}: {sum(1 for l in out.read_text().splitlines() if '==' in l)} packages")


if __name__ == "__main__":
    main()
