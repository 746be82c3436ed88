"""Fail-fast checks for pretrained weights: cached locally, or a hub we can actually reach; and a
local checkpoint that is no checkpoint (damaged, cut short, another file) named in one sentence.

Without network, open_clip and transformers retry downloads for most of a minute before giving
up with a generic error. These checks answer in a few seconds with a message that names the
missing weights and the offline alternative.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import socket
import zipfile
from pathlib import Path

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


# -- local checkpoint files -------------------------------------------------------------------------
CHECKPOINT_FIX = ("point model.pretrained at a complete checkpoint (open_clip: a torch.save or .safetensors file; "
                  "hf_clip/altclip: a save_pretrained directory), copy it again if it was cut short, "
                  "or set model.pretrained=null (altclip: false) for random weights")
_ZIP, _NPY = b"PK\x03\x04", b"\x93NUMPY"
_QUOTED = re.compile(r'"[^"]*"')  # a parameter name in load_state_dict's message


def _safetensors_problem(path: Path, size: int, head: bytes) -> str | None:
    """Why a safetensors file is unreadable: its 8-byte header length, JSON header and the data
    offsets it lists must cover the file exactly (a cut-short copy fails the last)."""
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if not 2 <= n <= size - 8:
        return "it is not a safetensors file (no valid header)"
    with open(path, "rb") as f:
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "its safetensors header is not valid JSON"
    if not isinstance(header, dict):
        return "its safetensors header is not a mapping"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    if max(ends, default=0) != size - 8 - n:
        return f"its safetensors header lists {max(ends, default=0)} bytes of tensors but the file holds {size - 8 - n}"
    return None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the file ``path`` cannot be a checkpoint torch or safetensors can read (None: it may be
    one). Reads its first bytes and, for a zip archive (``torch.save``, TorchScript, ``.npz``), its
    central directory: a copy cut short fails there, without loading any tensor."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
        if path.suffix == ".safetensors":
            return _safetensors_problem(path, size, head)
        if head.startswith(_ZIP):
            with zipfile.ZipFile(path) as z:
                z.namelist()
            return None
    except zipfile.BadZipFile as err:
        return f"its zip archive (torch.save format) is cut short or damaged ({err})"
    except OSError as err:
        return f"it cannot be read ({err.strerror or err})"
    if head.startswith(_NPY) or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return None  # a numpy array (open_clip's big_vision weights) or a legacy (pickle) torch.save file
    if _safetensors_problem(path, size, head) is None:
        return None  # safetensors under another suffix
    return "it is neither a torch.save archive nor a safetensors file"


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a ``save_pretrained`` directory that transformers would read."""
    return sorted([*directory.glob("*.safetensors"), *directory.glob("pytorch_model*.bin")])


def check_checkpoint(path: str | Path, setting: str = "model.pretrained") -> None:
    """One clear error naming the file when ``path`` (a checkpoint file, or a ``save_pretrained``
    directory: its weight files) is no readable checkpoint, before the backend loads it (torch
    would answer with a paragraph about ``weights_only`` or a zip reader's internals)."""
    path = Path(path)
    for file in weight_files(path) if path.is_dir() else [path]:
        problem = checkpoint_problem(file)
        if problem is not None:
            where = f"{setting}={path}" + (f": its {file.name}" if file != path else "")
            raise ClipXaiError(f"{where} is not a checkpoint: {problem}", CHECKPOINT_FIX)


def load_errors() -> tuple[type[BaseException], ...]:
    """What loading a user's checkpoint raises when the file or its tensors do not fit: torch's
    unpickler, zip reader and ``load_state_dict``, safetensors, open_clip's state-dict handling."""
    errors = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError, AttributeError, TypeError,
              StopIteration, OSError, zipfile.BadZipFile)
    try:
        from safetensors import SafetensorError
    except ImportError:
        return errors
    return (*errors, SafetensorError)


def load_failure(source: str, target: str, err: BaseException, setting: str = "model.pretrained") -> ClipXaiError:
    """One sentence for a checkpoint that the backend could not load into ``target`` (an architecture
    or model class): its first line, or for a state dict of another model the count of keys that do
    not match, instead of torch's paragraph."""
    text = str(err).strip()
    missing = re.search(r"Missing key\(s\) in state_dict: ((?:\"[^\"]*\"(?:, )?)+)", text)
    unexpected = re.search(r"Unexpected key\(s\) in state_dict: ((?:\"[^\"]*\"(?:, )?)+)", text)
    shapes = text.count("size mismatch for ")
    if missing or unexpected or shapes:
        counts = [f"{len(_QUOTED.findall(m.group(1)))} {what}"
                  for m, what in ((missing, "missing"), (unexpected, "unexpected")) if m]
        counts += [f"{shapes} of another shape"] if shapes else []
        why = f"its weights do not fit {target} ({', '.join(counts)} parameter names)"
    elif isinstance(err, StopIteration):
        why = "it holds no parameters (an empty state dict)"
    elif isinstance(err, EOFError) or not text or text == type(err).__name__:
        why = f"it ends early: cut short? ({type(err).__name__})"
    else:
        why = f"{type(err).__name__}: {text.splitlines()[0][:200]}"
    return ClipXaiError(f"{setting}={source} could not be loaded into {target}: {why}", CHECKPOINT_FIX)
