"""Build step: put the repository's ``conf/`` and ``experiments/`` into the built package.

The YAML has one home in git, ``conf/`` and ``experiments/`` at the top of the repository
(``conf/experiment`` is a symlink to ``../experiments``). A wheel must carry them, so the
``build_py`` command copies them into ``clip_xai/conf`` of the build tree (the wheel's
contents, never the source tree); ``clip_xai.__main__`` reads that folder in an installed
package and the repository's ``conf/`` in a checkout or an editable install. Wired up in
``pyproject.toml`` (``[tool.setuptools] cmdclass``); ``MANIFEST.in`` puts the inputs in the sdist.
"""
from __future__ import annotations

from pathlib import Path

from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PACKAGE_CONF = Path("clip_xai") / "conf"  # where the YAML goes, relative to the build tree


def conf_files(root: Path = ROOT) -> dict[Path, Path]:
    """Each YAML the package ships: destination under ``clip_xai/conf`` -> source file.

    ``conf/**/*.yaml`` keeps its layout; the ``experiment`` group comes from ``experiments/``
    itself (not through the symlink, which an sdist may not keep).
    """
    conf, experiments = root / "conf", root / "experiments"
    if not (conf / "config.yaml").is_file():
        raise FileNotFoundError(f"{conf / 'config.yaml'} is missing: build from the repository root or its sdist")
    files = {p.relative_to(conf): p for p in sorted(conf.rglob("*.yaml"))
             if p.relative_to(conf).parts[0] != "experiment"}
    files.update({Path("experiment") / p.name: p for p in sorted(experiments.glob("*.yaml"))})
    return files


class BuildPyWithConf(build_py):
    """``build_py`` that also copies the config tree into the package (not in editable mode,
    where the package reads the repository's ``conf/`` directly)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for dest, src in conf_files().items():
            target = Path(self.build_lib) / PACKAGE_CONF / dest
            self.mkpath(str(target.parent))
            self.copy_file(str(src), str(target), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return outputs + [str(Path(self.build_lib) / PACKAGE_CONF / dest) for dest in conf_files()]
