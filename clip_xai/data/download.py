"""Resumable, checksum-pinned downloads and safe unpacking into a staging folder.

`fetch` hands the transfer to pooch (hash check on a temporary file, moved into place only when
the hash matches) with a downloader of our own that keeps a ``<name>.part`` file between runs and
asks the server for the remaining bytes (HTTP Range), so an interrupted multi-GB download resumes
where it stopped. `Staging` unpacks into a hidden folder beside the destination and moves the
finished layout in at the end, so a failed prepare never leaves a half-written dataset.
"""
from __future__ import annotations

import logging
import os
import shutil
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from clip_xai.errors import ClipXaiError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
NET_CHUNK = 1 << 16  # network reads: an interrupted transfer loses at most this much of its tail
DOWNLOADS = ".downloads"  # inside the dataset root: partial and finished downloads (kept for resume)


@dataclass(frozen=True)
class Remote:
    """One file to download: URL, file name, pinned hash (``md5:...``/``sha256:...``, or None if unknown)."""

    url: str
    fname: str
    known_hash: str | None
    size: str = ""  # human-readable size for the messages ("1.1 GB")


class ResumableDownloader:
    """pooch downloader that resumes from ``<download_dir>/<fname>.part`` with an HTTP Range request.

    The partial file survives an interrupted transfer; a server that ignores Range (status 200)
    restarts it from zero. When complete, the part file is moved onto pooch's temporary file, so
    pooch's hash check decides whether it becomes the archive (a mismatch deletes it).
    """

    def __init__(self, part: Path, progressbar: bool = True, timeout: float = 60.0):
        self.part = Path(part)
        self.progressbar = progressbar
        self.timeout = timeout

    def __call__(self, url: str, output_file, pooch=None, check_only: bool = False):
        import requests

        have = self.part.stat().st_size if self.part.is_file() else 0
        headers = {"Accept-Encoding": "identity"}  # byte counts must match the file (resume offsets)
        if have:
            headers["Range"] = f"bytes={have}-"
        with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as resp:
            if resp.status_code == 416 and have:  # nothing left to fetch: the part file is complete
                total, mode = have, None
            else:
                resp.raise_for_status()
                if have and resp.status_code != 206:
                    log.info("%s ignored the resume request: downloading from the start", url)
                    have = 0
                mode = "ab" if have else "wb"
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
            if mode is not None:
                if have:
                    print(f"resuming {self.part.name[:-5]} at {have / 1e6:.1f} MB")
                with open(self.part, mode) as out, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, desc=self.part.name[:-5],
                    disable=True if not self.progressbar else None, leave=False,
                ) as bar:
                    for chunk in resp.iter_content(NET_CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
        if total is not None and self.part.stat().st_size != total:
            raise ClipXaiError(
                f"download of {url} stopped at {self.part.stat().st_size} of {total} bytes",
                "run the same command again: it resumes from the partial file",
            )
        shutil.move(str(self.part), str(output_file))


def fetch(remote: Remote, download_dir: Path, progressbar: bool = True) -> Path:
    """Download ``remote`` into ``download_dir`` (resuming a partial file), check its hash, return the path.

    A file already there with the right hash is reused. Errors are `ClipXaiError`s that name the
    URL and the fix (checksum mismatch: the file is deleted; network failure: the partial file stays).
    """
    import pooch
    import requests

    pooch.get_logger().setLevel(logging.WARNING)  # we print our own progress lines
    download_dir.mkdir(parents=True, exist_ok=True)
    part = download_dir / f"{remote.fname}.part"
    try:
        path = pooch.retrieve(remote.url, known_hash=remote.known_hash, fname=remote.fname, path=download_dir,
                              downloader=ResumableDownloader(part, progressbar))
    except ValueError as err:  # pooch: hash mismatch (the temporary file is already deleted)
        raise ClipXaiError(
            f"checksum mismatch for {remote.url}: {str(err).strip().splitlines()[0]}",
            "the server sent a different file (or it was corrupted in transit); nothing was unpacked. "
            "Run the command again, or download the file yourself and pass it as a local path",
        ) from None
    except requests.exceptions.RequestException as err:
        got = part.stat().st_size if part.is_file() else 0
        raise ClipXaiError(
            f"download of {remote.url} failed after {got / 1e6:.1f} MB: {type(err).__name__}: {err}",
            "check the network and run the same command again: it resumes from the partial file",
        ) from None
    return Path(path)


def check_local(path: Path, known_hash: str | None) -> Path:
    """A user-supplied archive: must exist; its pinned hash (if any) is checked, with a progress note."""
    import pooch

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ClipXaiError(f"file not found: {path}", "pass the path of the downloaded archive")
    if known_hash:
        alg, _, want = known_hash.partition(":")
        print(f"checking the {alg} of {path.name} ({path.stat().st_size / 1e9:.2f} GB) ...")
        got = pooch.file_hash(str(path), alg=alg)
        if got != want:
            raise ClipXaiError(f"checksum mismatch for {path}: {alg} {got}, expected {want}",
                               "the archive is incomplete or not the official file: download it again")
    return path


def _safe_target(dest: Path, name: str) -> Path:
    """Member path inside ``dest``; refuses absolute paths and ``..`` (archive path traversal)."""
    target = (dest / name).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise ClipXaiError(f"archive member {name!r} would be written outside {dest}",
                           "the archive is malformed; download it again from the official source")
    return target


def _members(archive: Path):
    """(name, is_dir, open) for each regular file or folder of a .zip or .tar(.gz), macOS metadata skipped."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for m in zf.infolist():
                yield m.filename, m.is_dir(), lambda m=m: zf.open(m)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for m in tf:
                if m.isfile() or m.isdir():
                    yield m.name, m.isdir(), lambda m=m: tf.extractfile(m)
    else:
        raise ClipXaiError(f"{archive} is neither a zip nor a tar archive",
                           "pass the official archive (download it again if it is truncated)")


def unpack(archive: Path, dest: Path, desc: str = "") -> None:
    """Unpack a .zip or .tar(.gz) into ``dest`` with a progress bar; ``__MACOSX`` metadata is skipped."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, is_dir, open_member in tqdm(_members(archive), desc=desc or f"unpacking {archive.name}", unit="file",
                                          leave=False, disable=None):
        if name.startswith("__MACOSX"):
            continue
        target = _safe_target(dest, name)
        if is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with open_member() as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)


class Staging:
    """A hidden work folder beside ``root``; `commit` moves the named entries into ``root``.

    Use as a context manager: on any error the staging folder is removed and ``root`` is left as
    it was: a root this prepare created is removed again if nothing but an empty download folder
    is left in it (a partial download stays, so the next run resumes it).
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.created_root = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".staging-*"):  # left by a killed earlier run
            log.info("removing the stale work folder %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        self.dir = self.root / f".staging-{os.getpid()}"
        self.dir.mkdir()

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if exc_type is None:
            return
        downloads = self.root / DOWNLOADS
        if downloads.is_dir() and not any(downloads.iterdir()):
            downloads.rmdir()
        if self.created_root and self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()

    def commit(self, entries: dict[str, Path]) -> None:
        """Move each staged path to ``root/<name>`` (renames within one file system: near-atomic)."""
        for name, src in entries.items():
            target = self.root / name
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(src, target)
