"""Offline checks of a dataset root against the official counts: images, captions, masks, companions.

`verify(name, root)` lists every image (and companion file) the loader would read, optionally
decodes them all (``deep``), and compares the counts with the official ones (sources in
`OFFICIAL`). The result is a `Report`: a table plus the problems found (unreadable files,
missing companions, counts that differ). `python -m clip_xai.data verify NAME` prints it and
exits non-zero on problems; the experiment entrypoint runs the cheap listing-only variant at
start-up (`preflight`) and points at the full check when a root looks wrong.
"""
from __future__ import annotations

import csv
import json
import logging
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image
from tqdm import tqdm

from clip_xai.data import conceptual_captions, imagenet
from clip_xai.data.base import _READ_ERRORS, resolve_root
from clip_xai.data.rival10 import RIVAL10_ATTRIBUTES, RIVAL10_WNIDS
from clip_xai.errors import ClipXaiError

log = logging.getLogger(__name__)

# Official counts (sources: Hodosh et al. 2013 and the Flickr8k_text files; Sharma et al. 2018 and
# the GCC-1.1.0 validation TSV; ILSVRC-2012 devkit readme; the RIVAL10 project page; Guillaumin et
# al. 2014 for ImageNet-segmentation).
OFFICIAL = {
    "flickr8k": {"images": 8091, "captions": 40455, "train": 6000, "dev": 1000, "test": 1000},
    "cc": {"urls": 15840},
    "imagenet": {"classes": 1000, "images": 50000, "per_class": 50},
    "rival10": {"images_approx": 26000},
    "imagenet_seg": {"images": 4276},  # Guillaumin et al. 2014; Chefer et al. 2021 §5
}
# Flickr8k.token.txt names one image that is not in Flicker8k_Dataset (its 5 captions make the
# 40,460 lines of the file versus 8,091 x 5 = 40,455): reported as a known quirk, not a problem.
FLICKR8K_KNOWN_ORPHANS = {"2258277193_586949ec62.jpg.1"}
SHOW = 10  # problems listed per kind before "... and N more"
PROVENANCE_FILE = "provenance.json"  # written by `prepare` where no checksum is published (source, sha256, date)


@dataclass
class Check:
    """One table row: what was counted, how many, the official number (None: none published)."""

    what: str
    found: int | str
    expected: int | str | None = None
    ok: bool = True
    note: str = ""


@dataclass
class Report:
    """Counts and problems for one dataset root."""

    name: str
    root: Path
    checks: list[Check] = field(default_factory=list)
    problems: dict[str, list[str]] = field(default_factory=dict)  # kind -> file names

    def count(self, what: str, found, expected=None, note: str = "", exact: bool = True) -> None:
        ok = expected is None or not exact or found == expected
        self.checks.append(Check(what, found, expected, ok, note))

    def problem(self, kind: str, items: Iterable[str]) -> None:
        items = sorted(items)
        if items:
            self.problems.setdefault(kind, []).extend(items)

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.checks)

    def summary_line(self) -> str:
        bad = [f"{c.what}: {c.found} (expected {c.expected})" for c in self.checks if not c.ok]
        bad += [f"{len(v)} {k}" for k, v in self.problems.items()]
        return "; ".join(bad) if bad else "ok"

    def render(self) -> str:
        from tabulate import tabulate

        rows = [(c.what, _fmt(c.found), "-" if c.expected is None else _fmt(c.expected),
                 "ok" if c.ok else "MISMATCH", c.note) for c in self.checks]
        out = [f"{self.name} at {self.root}", tabulate(rows, headers=["check", "found", "official", "status", "note"])]
        for kind, items in self.problems.items():
            more = f"\n    ... and {len(items) - SHOW} more" if len(items) > SHOW else ""
            out.append(f"{kind} ({len(items)}):\n    " + "\n    ".join(items[:SHOW]) + more)
        out.append("result: OK" if self.ok else f"result: PROBLEMS ({self.summary_line()})")
        return "\n".join(out)


def _fmt(v) -> str:
    return f"{v:,}" if isinstance(v, int) else str(v)


def _listdir(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _images(paths: Iterable[Path], extensions: set[str]) -> list[Path]:
    """The files among ``paths`` that a loader reads: ``extensions`` is that loader's own constant,
    so the verifier and the loader cannot disagree on which files count."""
    return [p for p in paths if p.suffix.lower() in extensions and p.is_file()]


def _decode(path: Path) -> str | None:
    """None if the image decodes fully, else the error."""
    try:
        with Image.open(path) as im:
            im.load()
        return None
    except _READ_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"


def unreadable(paths: list[Path], check: Callable[[Path], str | None] = _decode, workers: int = 4,
               desc: str = "decoding") -> list[str]:
    """Files whose `check` fails, as ``path: error`` (threads: PIL decodes outside the GIL)."""
    if not paths:
        return []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        errors = list(tqdm(pool.map(check, paths), total=len(paths), desc=desc, unit="file", leave=False, disable=None))
    return [f"{p}: {e}" for p, e in zip(paths, errors) if e is not None]


def _missing_root(name: str, path: Path, layout: str) -> ClipXaiError:
    return ClipXaiError(
        f"{name}: {path} not found (expected layout: {layout})",
        f"fetch it with `python -m clip_xai.data prepare {name} --root {path}`, or point --root at the data",
    )


# -- per dataset ---------------------------------------------------------------------------------
def verify_flickr8k(root: Path, deep: bool = True, workers: int = 4) -> Report:
    """Images, captions per image, split lists, unreadable images (Flickr8k_text + Flicker8k_Dataset)."""
    from clip_xai.data.flickr8k import read_flickr8k_tokens

    rep = Report("flickr8k", root)
    images_dir = next((d for d in (root / "Flicker8k_Dataset", root / "Flickr8k_Dataset") if d.is_dir()), None)
    text = root / "Flickr8k_text"
    if images_dir is None or not (text / "Flickr8k.token.txt").is_file():
        raise _missing_root("flickr8k", root, "Flicker8k_Dataset/*.jpg and Flickr8k_text/Flickr8k.token.txt")
    off = OFFICIAL["flickr8k"]
    # the Flickr8k loader opens images by caption name; count the formats the CC loader reads
    images = {p.name: p for p in _images(_listdir(images_dir), conceptual_captions.IMAGE_EXTENSIONS)}
    captions = read_flickr8k_tokens(text / "Flickr8k.token.txt")
    rep.count("images", len(images), off["images"])
    n_caps = sum(len(c) for name, c in captions.items() if name in images)
    rep.count("captions of present images", n_caps, off["captions"])
    orphans = set(captions) - set(images)
    known = orphans & FLICKR8K_KNOWN_ORPHANS
    if known:
        rep.count("captioned names not in the image folder", len(known), len(FLICKR8K_KNOWN_ORPHANS),
                  note="a known quirk of the official token file")
    rep.problem("captions whose image is missing", orphans - FLICKR8K_KNOWN_ORPHANS)
    rep.problem("images without captions", [n for n in images if n not in captions])
    rep.problem("images with fewer than 5 captions", [n for n in images if n in captions and len(captions[n]) < 5])
    for split in ("train", "dev", "test"):
        path = text / f"Flickr_8k.{split}Images.txt"
        if not path.is_file():
            rep.problem("missing split lists", [str(path)])
            continue
        names = [n.strip() for n in path.read_text(encoding="utf-8").splitlines() if n.strip()]
        rep.count(f"{split} split", len(names), off[split])
        rep.problem(f"{split}-split images missing", [n for n in names if n not in images])
    if deep:
        rep.problem("unreadable images", unreadable(list(images.values()), workers=workers))
    return rep


def _rival10_folder(root: Path, split: str) -> Path | None:
    return next((d for d in (root / split / "ordinary", root / "RIVAL10" / split / "ordinary") if d.is_dir()), None)


def _check_rival10_companions(image: Path) -> str | None:
    """Decode the image and merged mask, load the (2,18) attribute labels and the mask pickle."""
    stem = str(image.with_suffix(""))
    err = _decode(image) or _decode(Path(stem + "_merged_mask.JPEG"))
    if err:
        return err
    try:
        labels = np.load(stem + "_attr_labels.npy")
        if labels.shape != (2, len(RIVAL10_ATTRIBUTES)):
            return f"attr_labels shape {labels.shape}, expected (2, {len(RIVAL10_ATTRIBUTES)})"
        with open(stem + "_attr_dict.pkl", "rb") as f:
            masks = pickle.load(f)
        if not isinstance(masks, dict):
            return f"attr_dict.pkl holds a {type(masks).__name__}, expected a dict"
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, AttributeError, ImportError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def verify_rival10(root: Path, deep: bool = True, workers: int = 4) -> Report:
    """Per split: images of the 20 source wnids and their mask/label companions; decodes them all if deep."""
    rep = Report("rival10", root)
    folders = {s: _rival10_folder(root, s) for s in ("train", "test")}
    if not any(folders.values()):
        raise _missing_root("rival10", root, "RIVAL10/{train,test}/ordinary/<wnid>_*.JPEG")
    total, companions = 0, ("_attr_labels.npy", "_merged_mask.JPEG", "_attr_dict.pkl")
    for split, folder in folders.items():
        if folder is None:
            rep.problem("missing splits", [f"{root}/{split}/ordinary"])
            continue
        files = _listdir(folder)
        names = {p.name for p in files}
        images = [p for p in files if p.suffix == ".JPEG" and not p.name.endswith("_merged_mask.JPEG")]
        is_known = [p.stem.split("_")[0] in RIVAL10_WNIDS for p in images]  # one pass: no list lookups
        known = [p for p, ok in zip(images, is_known) if ok]
        rep.count(f"{split} images", len(known))
        total += len(known)
        rep.problem(f"{split}: images of other wnids (ignored by the loader)",
                    [p.name for p, ok in zip(images, is_known) if not ok])
        for suffix in companions:
            missing = [p.name for p in known if p.stem + suffix not in names]
            rep.count(f"{split} {suffix.lstrip('_')}", len(known) - len(missing))
            rep.problem(f"{split}: images without {suffix.lstrip('_')}", missing)
        if deep:
            complete = [p for p in known if all(p.stem + s in names for s in companions)]
            rep.problem(f"{split}: unreadable image or companion", unreadable(
                complete, _check_rival10_companions, workers, desc=f"checking {split}"))
    rep.count("images (train + test)", total, "~26k", note="project page: 26k images; per-split sizes not published",
              exact=False)
    return rep


def verify_imagenet(root: Path, deep: bool = True, workers: int = 4) -> Report:
    """val/<wnid>/*.JPEG: class folders, images per class, class-name file, unreadable images."""
    import re

    rep = Report("imagenet", root)
    wnid = re.compile(r"n\d{8}")
    folder = root / "val" if (root / "val").is_dir() else root
    if not folder.is_dir() or not any(wnid.fullmatch(d.name) for d in folder.iterdir() if d.is_dir()):
        raise _missing_root("imagenet", root, "val/<wnid>/*.JPEG")
    off = OFFICIAL["imagenet"]
    classes = [d for d in _listdir(folder) if d.is_dir()]
    rep.problem("folders that are not wnids", [d.name for d in classes if not wnid.fullmatch(d.name)])
    classes = [d for d in classes if wnid.fullmatch(d.name)]
    per_class = {d.name: _images(_listdir(d), imagenet.IMAGE_EXTENSIONS) for d in classes}
    rep.count("classes", len(classes), off["classes"])
    rep.count("images", sum(map(len, per_class.values())), off["images"])
    rep.count("classes with 50 images", sum(len(v) == off["per_class"] for v in per_class.values()), len(classes))
    mapping = next((d / "LOC_synset_mapping.txt" for d in (root, folder) if (d / "LOC_synset_mapping.txt").is_file()), None)
    rep.count("class-name file", "LOC_synset_mapping.txt" if mapping else "none",
              note="" if mapping else "CLIP names need all 1000 classes without it")
    if deep:
        rep.problem("unreadable images", unreadable([p for v in per_class.values() for p in v], workers=workers))
    return rep


def _check_seg_entry(f, index: int) -> str | None:
    """None if image ``index`` and its mask read back with matching sizes and a 0/1 mask, else why."""
    from clip_xai.data.imagenet_seg import read_image, read_mask_raw

    try:
        img = read_image(f, index)
        raw = read_mask_raw(f, index)
    except (KeyError, TypeError, IndexError, RuntimeError, ValueError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        return f"image of shape {img.shape} and dtype {img.dtype}, expected (H, W, 3) uint8"
    if raw.T.shape != img.shape[:2]:
        return f"mask {raw.T.shape} differs from the image {img.shape[:2]}"
    if not np.isin(raw, (0, 1)).all():
        return f"mask values {np.unique(raw)[:5].tolist()}, expected 0/1"
    return None


def verify_imagenet_seg(root: Path, deep: bool = True, workers: int = 4) -> Report:
    """gtsegs_ijcv.mat: HDF5 layout, image/mask/class counts, recorded sha256; reads every entry if deep."""
    from clip_xai.data import imagenet_seg as seg

    path = seg.mat_path(root)
    if not path.is_file():
        raise _missing_root("imagenet_seg", path.parent if path.name == seg.MAT_FILE else path, seg.LAYOUT)
    rep = Report("imagenet_seg", path)
    try:
        f = seg.open_mat(path)
    except ClipXaiError as err:
        rep.problem("unusable file", [err.problem])
        return rep
    with f:
        n = f[seg.IMAGES].shape[0]
        rep.count("images", n, OFFICIAL["imagenet_seg"]["images"])
        rep.count("masks", f[seg.MASKS].shape[0], n)
        try:
            wnids, field = seg.read_wnids(f)
            rep.count(f"classes ({field})", len(set(wnids)), note="wnid of each image's ImageNet id")
        except ClipXaiError as err:
            rep.problem("no class per image", [err.problem])
        if deep:
            bad = [(i, seg_err) for i in tqdm(range(n), desc="reading entries", unit="image", leave=False, disable=None)
                   if (seg_err := _check_seg_entry(f, i)) is not None]  # h5py serialises reads: no threads
            rep.problem("unreadable or inconsistent entries", [f"entry {i}: {e}" for i, e in bad])
    prov = path.parent / PROVENANCE_FILE
    recorded = json.loads(prov.read_text()).get("sha256") if prov.is_file() else None
    rep.count("sha256 recorded by prepare", recorded or "none", note="no official checksum is published")
    if deep and recorded:
        import pooch

        got = pooch.file_hash(str(path))
        rep.count("sha256 of the file", got, recorded, note="equals the recorded one" if got == recorded else "")
    return rep


def _read_manifest(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def verify_cc(root: Path, deep: bool = True, workers: int = 4) -> Report:
    """img2dataset "files" folder (images + caption .txt, manifest.csv if prepared here) or an image_path,caption table."""
    rep = Report("cc", root)
    if root.is_file():
        from clip_xai.data.conceptual_captions import _records_from_table

        records = _records_from_table(root)
        paths = [Path(r.image) for r in records]
        rep.count("rows", len(records))
        rep.problem("listed images missing", [str(p) for p in paths if not p.is_file()])
        if deep:
            rep.problem("unreadable images", unreadable([p for p in paths if p.is_file()], workers=workers))
        return rep
    if not root.is_dir():
        raise _missing_root("cc", root, "<shard>/000000001.jpg + 000000001.txt (img2dataset 'files')")
    files = [p for d in _listdir(root) if d.is_dir() for p in _listdir(d)]
    images = _images(files, conceptual_captions.IMAGE_EXTENSIONS)
    names = {str(p) for p in files}
    has_caption = [str(p.with_suffix(".txt")) in names for p in images]  # one pass: no list lookups
    captioned = [p for p, ok in zip(images, has_caption) if ok]
    rep.count("images with a caption", len(captioned))
    rep.problem("images without a caption .txt", [str(p) for p, ok in zip(images, has_caption) if not ok])
    manifest = root / "manifest.csv"
    if manifest.is_file():
        rows = _read_manifest(manifest)
        ok = [r for r in rows if r.get("status") == "success"]
        rep.count("URLs tried", len(rows), OFFICIAL["cc"]["urls"], exact=False,
                  note="dead links are expected" + ("" if len(rows) >= OFFICIAL["cc"]["urls"] else
                                                    "; fewer URLs than the official list (--limit?)"))
        rep.count("URLs failed", len(rows) - len(ok), note="see manifest.csv (status, error_message)")
        rep.count("downloaded images on disk", len(captioned), len(ok), note="manifest successes")
    if deep:
        rep.problem("unreadable images", unreadable(captioned, workers=workers))
    return rep


VERIFIERS: dict[str, Callable[..., Report]] = {
    "rival10": verify_rival10, "flickr8k": verify_flickr8k, "cc": verify_cc, "imagenet": verify_imagenet,
    "imagenet_seg": verify_imagenet_seg,
}


def verify(name: str, root: str | Path, deep: bool = True, workers: int = 4) -> Report:
    """Run the checks for dataset ``name`` on ``root`` (a `ClipXaiError` when the root is missing entirely)."""
    if name not in VERIFIERS:
        raise ClipXaiError(f"no checks for dataset {name!r}", f"choose one of {sorted(VERIFIERS)}")
    return VERIFIERS[name](resolve_root(root), deep=deep, workers=workers)


def preflight(name: str, root: str | Path | None) -> Report | None:
    """Start-up check of an experiment's dataset root: listing only (no decoding).

    A missing root is an error that names `prepare`; a root that differs from the official counts
    (or misses companions) is a warning naming the full `verify` command, since subsets and
    fixtures are legitimate. Datasets without checks (the built-in sample set) return None.
    """
    if name not in VERIFIERS or root is None:
        return None
    try:
        rep = verify(name, root, deep=False)
    except ClipXaiError as err:
        raise ClipXaiError(err.problem, f"set `dataset.root=/path/to/{name}` (default $CLIP_XAI_DATA/{name}), or "
                           f"fetch it with `python -m clip_xai.data prepare {name} --root {resolve_root(root)}`") from None
    if not rep.ok:
        log.warning("dataset %s at %s looks incomplete or unusual: %s. Run `python -m clip_xai.data verify %s "
                    "--root %s` for the full check", name, rep.root, rep.summary_line(), name, rep.root)
    return rep
