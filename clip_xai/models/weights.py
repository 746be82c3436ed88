"""Fail-fast checks for pretrained weights: cached locally, or a hub we can actually reach.

Without network, open_clip and transformers retry downloads for most of a minute before giving
up with a generic error. These checks answer in a few seconds with a message that names the
missing weights and the offline alternative.
"""
from __future__ import annotations

import os
import socket

from clip_xai.errors import ClipXaiError

OFFLINE_FIX = (
    "run the same experiment offline on the tiny random model with `model=tiny` "
    "(`make run MODEL=tiny`), or pass a local checkpoint path as model.pretrained=/path/to/weights"
)


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub opens within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hf_cached(repo_id: str, filenames: list[str], cache_dir: str | None) -> bool:
    from huggingface_hub import hf_hub_download

    for name in filenames:
        try:
            hf_hub_download(repo_id, name, cache_dir=cache_dir, local_files_only=True)
            return True
        except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
            continue
    return False


def ensure_reachable_weights(arch: str, tag: str, cache_dir: str | None = None) -> None:
    """Raise ClipXaiError at once if open_clip weights ``arch``/``tag`` are neither cached nor downloadable."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        raise ClipXaiError(f"open_clip has no pretrained tag {tag!r} for {arch}",
                           f"use one of {open_clip.list_pretrained_tags_by_model(arch)} or a local checkpoint path")
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if _hf_cached(repo_id, names, cache_dir):
            return
    url = cfg.get("url", "")
    if url:
        root = cache_dir or os.path.expanduser("~/.cache/clip")
        if os.path.exists(os.path.join(root, os.path.basename(url))):
            return
    if not hub_reachable():
        raise ClipXaiError(
            f"pretrained weights {arch} ({tag}) are not in the local cache and the model hub is unreachable (offline)",
            OFFLINE_FIX,
        )


def ensure_reachable_hf(repo_id: str, cache_dir: str | None = None) -> None:
    """Same check for a transformers ``from_pretrained`` repo id."""
    if _hf_cached(repo_id, ["config.json"], cache_dir):
        return
    if not hub_reachable():
        raise ClipXaiError(
            f"pretrained weights {repo_id} are not in the local cache and the model hub is unreachable (offline)",
            OFFLINE_FIX,
        )
