"""Where clip_xai's own files live: the config tree. A low module, so library code never imports
the entrypoint to find it."""
from __future__ import annotations

from pathlib import Path


def conf_dir() -> Path:
    """The config tree: ``clip_xai/conf`` in an installed wheel (the build copies the repository's
    ``conf/`` and ``experiments/`` there), else ``conf/`` beside the package (checkout, editable
    install). The packaged copy comes first, so a stray ``conf/`` in site-packages is never used."""
    package = Path(__file__).resolve().parent
    candidates = (package / "conf", package.parent / "conf")
    return next((c for c in candidates if (c / "config.yaml").is_file()), candidates[0])


CONF_DIR = str(conf_dir())
