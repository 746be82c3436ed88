"""`prepare`: get each dataset the way its owners distribute it and arrange it for the loader.

One `Source` per dataset says where it comes from, under which terms, how big it is and which
top-level entries of the root it writes; its ``build`` function fetches (resumable, checksum
pinned where a public checksum exists), unpacks into a staging folder and commits the loader's
layout. `prepare` prints the terms first, refuses to overwrite a different earlier attempt
without ``--force``, and finishes with the full `verify`.

Pinned checksums and where they come from (no other checksums are pinned, and none is invented):
- Flickr8k zips (md5): the R ``torchvision`` package's ``flickr8k_dataset`` (mlverse/torchvision).
- Conceptual Captions validation TSV (sha256, 2,603,670 bytes): Hugging Face ``datasets``'
  ``conceptual_captions/dataset_infos.json``.
- ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz (md5): ``torchvision.datasets.imagenet``.
- RIVAL10 zip: no published checksum; the result is verified by counting files and companions.
- Kaggle ``LOC_val_solution.csv``: no published checksum; verified by its 50,000 rows.
- ImageNet-segmentation ``gtsegs_ijcv.mat``: no published checksum; verified by its layout and
  4,276 entries, and the sha256 of the file used is recorded in ``provenance.json`` beside it.
"""
from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from clip_xai.data.download import DOWNLOADS, Remote, Staging, check_local, fetch, unpack
from clip_xai.data.verify import OFFICIAL, PROVENANCE_FILE, Report, verify
from clip_xai.errors import ClipXaiError

log = logging.getLogger(__name__)


@dataclass
class Options:
    """Command-line choices shared by every dataset (unused ones are ignored per dataset)."""

    archives: list[Path] = field(default_factory=list)  # local archives instead of downloading
    url: str | None = None          # replaces the (single) download URL, e.g. the RIVAL10 link
    mirror: str | None = None       # URL prefix replacing the official host for every file
    limit: int | None = None        # cc: first N URLs of the validation list
    processes: int = 4              # cc: img2dataset processes
    threads: int = 32               # cc: img2dataset threads per process
    devkit: Path | None = None      # imagenet: ILSVRC2012_devkit_t12.tar.gz
    loc_csv: Path | None = None     # imagenet: Kaggle LOC_val_solution.csv
    synsets: Path | None = None     # imagenet: LOC_synset_mapping.txt to copy beside val/
    keep_archives: bool = False
    force: bool = False
    progress: bool = True
    workers: int = 4                # verify: decoding threads


@dataclass(frozen=True)
class Source:
    """Where a dataset comes from, its terms and size, and how `prepare` builds it."""

    name: str
    title: str
    homepage: str
    licence: str
    disk: str
    entries: tuple[str, ...]  # top-level names written into the root
    remotes: tuple[Remote, ...]
    build: Callable[["Source", Path, Options, Staging], dict[str, Path]]

    def banner(self, root: Path, remotes: list[Remote] | None = None) -> str:
        """Source, files (URLs as this run will fetch them), terms, disk size and target, printed first."""
        files = "\n".join(f"  {r.url or r.fname + ' (you supply it)'}  ({r.size or 'size unknown'}; checksum "
                          f"{r.known_hash or 'not published: verified by counts'})" for r in remotes or self.remotes)
        return (f"== {self.title}\nsource:  {self.homepage}\n{files}\nterms:   {self.licence}\n"
                f"disk:    {self.disk}\ntarget:  {root}\n")


def _remotes(src: Source, opts: Options) -> list[Remote]:
    """The files to fetch, with --url / --mirror applied."""
    if opts.url and len(src.remotes) != 1:
        raise ClipXaiError(f"--url replaces a single download, but {src.name} has {len(src.remotes)}",
                           "use --mirror URL_PREFIX (each file name is appended) or --archive PATH per file")
    out = []
    for r in src.remotes:
        url = opts.url or (f"{opts.mirror.rstrip('/')}/{r.fname}" if opts.mirror else r.url)
        out.append(Remote(url, r.fname, r.known_hash, r.size))
    return out


def _obtain(src: Source, root: Path, opts: Options) -> list[Path]:
    """Archive paths in ``remotes`` order: local ``--archive`` files are matched by file name (a
    single archive matches a single download whatever its name), the rest are downloaded."""
    remotes = _remotes(src, opts)
    local = {Path(a).name: Path(a) for a in opts.archives}
    paths = []
    for r in remotes:
        given = local.get(r.fname) or (Path(opts.archives[0]) if len(opts.archives) == 1 == len(remotes) else None)
        if given is not None:
            paths.append(check_local(given, r.known_hash))
            continue
        if not r.url:
            raise ClipXaiError(
                f"{src.name}: {r.fname} cannot be downloaded automatically (its terms forbid redistribution)",
                f"download it yourself from {src.homepage}, then pass --archive /path/to/{r.fname} "
                "(or --url with the download link you were given)",
            )
        done = (root / DOWNLOADS / r.fname).is_file()
        print(f"{'reusing the finished download of' if done else 'downloading'} {r.url}")
        paths.append(fetch(r, root / DOWNLOADS, opts.progress))
    for r, path in zip(remotes, paths):
        if r.known_hash is None:  # no official checksum: record what was used, for comparing copies later
            import pooch

            print(f"sha256 of {path.name}: {pooch.file_hash(str(path))} (no official checksum is published)")
    return paths


def _find_dir(base: Path, match: Callable[[Path], bool], what: str) -> Path:
    """The shallowest directory under ``base`` (itself included) satisfying ``match``."""
    for d in sorted((p for p in [base, *base.rglob("*")] if p.is_dir()), key=lambda p: len(p.parts)):
        if match(d):
            return d
    raise ClipXaiError(f"the archive does not contain {what}", "check that you passed the official archive")


# -- RIVAL10 --------------------------------------------------------------------------------------
def _build_rival10(src: Source, root: Path, opts: Options, stage: Staging) -> dict[str, Path]:
    (zip_path,) = _obtain(src, root, opts)
    unpack(zip_path, stage.dir / "x")
    top = _find_dir(stage.dir / "x", lambda d: (d / "test" / "ordinary").is_dir() or (d / "train" / "ordinary").is_dir(),
                    "RIVAL10/{train,test}/ordinary/")
    return {"RIVAL10": top}


# -- Flickr8k -------------------------------------------------------------------------------------
def _build_flickr8k(src: Source, root: Path, opts: Options, stage: Staging) -> dict[str, Path]:
    images_zip, text_zip = _obtain(src, root, opts)
    unpack(images_zip, stage.dir / "images")
    unpack(text_zip, stage.dir / "text")
    images = _find_dir(stage.dir / "images", lambda d: d.name in ("Flicker8k_Dataset", "Flickr8k_Dataset"),
                       "the Flicker8k_Dataset/ folder")
    text = _find_dir(stage.dir / "text", lambda d: (d / "Flickr8k.token.txt").is_file(), "Flickr8k.token.txt")
    return {"Flicker8k_Dataset": images, "Flickr8k_text": text}


# -- Conceptual Captions --------------------------------------------------------------------------
def _read_cc_tsv(path: Path, limit: int | None) -> list[tuple[str, str]]:
    """(caption, url) rows of the official headerless ``caption<TAB>url`` list, first ``limit`` only."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        caption, sep, url = line.rpartition("\t")
        if not sep or not url.startswith(("http://", "https://")):
            raise ClipXaiError(f"{path}: line {n} is not caption<TAB>url: {line[:80]!r}",
                               "pass the official Validation_GCC-1.1.0-Validation.tsv")
        rows.append((caption.strip(), url.strip()))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def _img2dataset_download() -> Callable:
    """img2dataset's ``download``, or the error naming the install command (checked before any work)."""
    try:
        from img2dataset import download
    except ImportError:
        raise ClipXaiError("img2dataset is not installed (Conceptual Captions images are fetched with it)",
                           "pip install 'clip_xai[cc]'  (or: pip install img2dataset)") from None
    return download


def run_img2dataset(url_table: Path, output: Path, processes: int, threads: int) -> None:
    """Fetch every URL of ``url_table`` (parquet: url, caption) into img2dataset's "files" layout.

    Original bytes are kept (no resize, no re-encode): the loader applies CLIP's own preprocessing.
    Incremental mode: a re-run skips the shards already written.
    """
    _img2dataset_download()(url_list=str(url_table), input_format="parquet", url_col="url", caption_col="caption",
             output_format="files", output_folder=str(output), processes_count=processes, thread_count=threads,
             resize_mode="no", skip_reencode=True, incremental_mode="incremental", timeout=10, retries=1,
             enable_wandb=False)


def write_cc_manifest(root: Path) -> tuple[int, int, dict[str, int]]:
    """Gather img2dataset's per-shard parquet tables into ``root/manifest.csv``.

    Columns: key, url, caption, status, error_message, image (relative path, empty when failed).
    Returns (URLs, failed, the most common failure messages with their counts).
    """
    import pandas as pd

    shards = sorted(root.glob("*.parquet"))
    if not shards:
        raise ClipXaiError(f"img2dataset wrote no shard tables under {root}", "look at its output above for the cause")
    frames = []
    for shard in shards:
        f = pd.read_parquet(shard, columns=["key", "url", "caption", "status", "error_message"])
        f["image"] = [f"{shard.stem}/{k}.jpg" if s == "success" else "" for k, s in zip(f["key"], f["status"])]
        frames.append(f)
    table = pd.concat(frames, ignore_index=True).sort_values("key")
    from clip_xai.sinks.results import atomic_write

    atomic_write(root / "manifest.csv", lambda tmp: table.to_csv(tmp, index=False))
    failed = table[table["status"] != "success"]
    reasons = failed["error_message"].fillna(failed["status"]).astype(str).str.slice(0, 80).value_counts()
    return len(table), len(failed), {k: int(v) for k, v in reasons.head(5).items()}


def _build_cc(src: Source, root: Path, opts: Options, stage: Staging) -> dict[str, Path]:
    import pandas as pd

    _img2dataset_download()
    (tsv,) = _obtain(src, root, opts)
    rows = _read_cc_tsv(tsv, opts.limit)
    table = root / DOWNLOADS / "urls.parquet"
    table.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["caption", "url"]).to_parquet(table, index=False)
    print(f"fetching {len(rows):,} images with img2dataset into {root} (many CC URLs are dead: failures are expected)")
    run_img2dataset(table, root, opts.processes, opts.threads)
    urls, failed, reasons = write_cc_manifest(root)
    print(f"img2dataset: {urls:,} URLs, {urls - failed:,} images, {failed:,} failed; manifest: {root / 'manifest.csv'}")
    for reason, n in reasons.items():
        print(f"  {n:>6,}  {reason}")
    return {}  # img2dataset writes straight into the root (its incremental mode resumes there)


# -- ImageNet -------------------------------------------------------------------------------------
def _devkit_labels(devkit: Path, stage: Path) -> tuple[dict[int, str], dict[str, str]]:
    """(validation image index -> wnid, wnid -> class words) from the ILSVRC-2012 devkit."""
    import scipy.io

    unpack(devkit, stage / "devkit", desc="unpacking the devkit")
    data = _find_dir(stage / "devkit", lambda d: (d / "meta.mat").is_file()
                     and (d / "ILSVRC2012_validation_ground_truth.txt").is_file(),
                     "data/meta.mat with data/ILSVRC2012_validation_ground_truth.txt")
    synsets = scipy.io.loadmat(str(data / "meta.mat"), squeeze_me=True)["synsets"]
    leaves = [s for s in synsets if int(s["num_children"]) == 0]  # the 1000 classes (no parents)
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
    words = {str(s["WNID"]): str(s["words"]) for s in leaves}
    truth = [int(t) for t in (data / "ILSVRC2012_validation_ground_truth.txt").read_text().split()]
    unknown = sorted(set(truth) - set(id_to_wnid))
    if unknown:
        raise ClipXaiError(f"the devkit's ground truth uses class ids {unknown[:5]} that meta.mat does not define",
                           "pass the official ILSVRC2012_devkit_t12.tar.gz")
    return {i + 1: id_to_wnid[t] for i, t in enumerate(truth)}, words


def _loc_labels(csv_path: Path) -> dict[int, str]:
    """(validation image index -> wnid) from Kaggle's LOC_val_solution.csv (first box's wnid)."""
    import csv

    out = {}
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
            raise ClipXaiError(f"{csv_path} has columns {reader.fieldnames}, expected ImageId,PredictionString",
                               "pass Kaggle's LOC_val_solution.csv (ImageNet Object Localization Challenge)")
        for row in reader:
            out[_val_index(row["ImageId"])] = row["PredictionString"].split()[0]
    return out


def _val_index(name: str) -> int:
    """ILSVRC2012_val_00000042(.JPEG) -> 42."""
    stem = Path(name).name.split(".")[0]
    if not stem.startswith("ILSVRC2012_val_"):
        raise ClipXaiError(f"unexpected validation image name {name!r}", "pass the official ILSVRC2012_img_val.tar")
    return int(stem.rsplit("_", 1)[1])


def _build_imagenet(src: Source, root: Path, opts: Options, stage: Staging) -> dict[str, Path]:
    import tarfile

    if not opts.archives:
        raise ClipXaiError("imagenet needs your copy of ILSVRC2012_img_val.tar (it cannot be downloaded without "
                           "an image-net.org account)",
                           "pass --archive /path/to/ILSVRC2012_img_val.tar plus --devkit ILSVRC2012_devkit_t12.tar.gz "
                           "or --loc-csv LOC_val_solution.csv")
    if (opts.devkit is None) == (opts.loc_csv is None):
        raise ClipXaiError("imagenet needs exactly one label source", "pass either --devkit "
                           "ILSVRC2012_devkit_t12.tar.gz or --loc-csv LOC_val_solution.csv (Kaggle)")
    val_remote, devkit_remote = src.remotes
    val_tar = check_local(Path(opts.archives[0]), val_remote.known_hash)
    words: dict[str, str] = {}
    if opts.devkit is not None:
        labels, words = _devkit_labels(check_local(opts.devkit, devkit_remote.known_hash), stage.dir)
    else:
        labels = _loc_labels(check_local(opts.loc_csv, None))
    if len(labels) != OFFICIAL["imagenet"]["images"]:
        log.warning("the label file lists %d images, the official validation set has %d",
                    len(labels), OFFICIAL["imagenet"]["images"])
    val = stage.dir / "val"
    unlabeled = []
    with tarfile.open(val_tar) as tf:
        from tqdm import tqdm

        for m in tqdm(tf, desc="sorting images into val/<wnid>/", unit="file", disable=True if not opts.progress else None, leave=False):
            if not m.isfile():
                continue
            wnid = labels.get(_val_index(m.name))
            if wnid is None:
                unlabeled.append(m.name)
                continue
            target = val / wnid / Path(m.name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            with tf.extractfile(m) as s, open(target, "wb") as out:
                shutil.copyfileobj(s, out, 1 << 20)
    if unlabeled:
        raise ClipXaiError(f"{len(unlabeled)} image(s) in {val_tar.name} have no label, e.g. {unlabeled[0]}",
                           "the label file does not belong to this archive: use the ILSVRC-2012 devkit or Kaggle's csv")
    entries = {"val": val}
    mapping = stage.dir / "LOC_synset_mapping.txt"
    if opts.synsets is not None:
        shutil.copyfile(check_local(opts.synsets, None), mapping)
        entries["LOC_synset_mapping.txt"] = mapping
    elif words:  # the devkit's names, in the standard (sorted wnid) order the loader expects
        mapping.write_text("".join(f"{w} {words[w]}\n" for w in sorted(words)), encoding="utf-8")
        entries["LOC_synset_mapping.txt"] = mapping
    return entries


# -- ImageNet-segmentation ------------------------------------------------------------------------
def _build_imagenet_seg(src: Source, root: Path, opts: Options, stage: Staging) -> dict[str, Path]:
    import pooch

    from clip_xai.data.imagenet_seg import MAT_FILE, open_mat, read_wnids

    (mat,) = _obtain(src, root, opts)
    with open_mat(mat) as f:  # the layout is checked before anything is committed
        read_wnids(f)
    target = stage.dir / MAT_FILE
    if mat.parent == root / DOWNLOADS:
        shutil.move(str(mat), target)  # our own download: move, do not copy a large file
    else:
        shutil.copyfile(mat, target)  # the user's file stays where it is
    remote = _remotes(src, opts)[0]
    record = {"file": MAT_FILE, "source": str(mat) if opts.archives else remote.url, "bytes": target.stat().st_size,
              "sha256": pooch.file_hash(str(target)), "checksum_published": False,
              "prepared_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (stage.dir / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return {MAT_FILE: target, PROVENANCE_FILE: stage.dir / PROVENANCE_FILE}


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source(
        "rival10", "RIVAL10 (Moayeri et al., CVPR 2022)", "https://github.com/mmoayeri/RIVAL10",
        "University of Maryland licence: non-commercial use by university, non-profit or research institutions; "
        "the data may not be copied, sold or given to third parties. You download it yourself from the project "
        "page (the README there links the zip: https://app.box.com/index.php?rm=box_download_shared_file"
        "&shared_name=iflviwl5rbdgtur1rru3t8f7v2vp0gww&file_id=f_944375052992), then pass --archive or --url.",
        "zip and unpacked folder both several GB (26k images with masks and augmented copies)",
        ("RIVAL10",), (Remote("", "RIVAL10.zip", None, "several GB"),), _build_rival10),
    Source(
        "flickr8k", "Flickr8k (Hodosh, Young & Hockenmaier, JAIR 2013)",
        "https://github.com/jbrownlee/Datasets/releases/tag/Flickr8k (mirror of the UIUC release)",
        "Flickr images under their owners' terms, distributed by UIUC for research use; cite Hodosh et al. 2013.",
        "about 1.1 GB download, 1.1 GB unpacked",
        ("Flicker8k_Dataset", "Flickr8k_text"),
        (Remote("https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip",
                "Flickr8k_Dataset.zip", "md5:f18a1e2920de5bd84dae7cf08ec78978", "1.1 GB"),
         Remote("https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip",
                "Flickr8k_text.zip", "md5:bf6c1abcb8e4a833b7f922104de18627", "2.3 MB")), _build_flickr8k),
    Source(
        "cc", "Conceptual Captions, validation split (Sharma et al., ACL 2018)",
        "https://ai.google.com/research/ConceptualCaptions/download",
        "the URL/caption list may be used freely (Google asks for acknowledgement, no warranty); each image "
        "stays under its own web site's terms and is fetched from there by img2dataset.",
        "2.6 MB list; images about 1-2 GB for the ~15k URLs that still work (original sizes)",
        (), (Remote("https://storage.googleapis.com/gcc-data/Validation/GCC-1.1.0-Validation.tsv",
                    "Validation_GCC-1.1.0-Validation.tsv",
                    "sha256:528a0c939ec2ad8d1740bd3f459a51e9fe67643050e29f68fabb6da3f8ac985d", "2.6 MB"),), _build_cc),
    Source(
        "imagenet", "ImageNet ILSVRC-2012 validation (Russakovsky et al., IJCV 2015)", "https://image-net.org/download",
        "ImageNet terms of access: non-commercial research and education only; you download the archives "
        "with your own image-net.org account. Nothing is downloaded here.",
        "6.4 GB tar; 6.4 GB unpacked (50,000 images)",
        ("val", "LOC_synset_mapping.txt"),
        (Remote("", "ILSVRC2012_img_val.tar", "md5:29b22e2961454d5413ddabcf34fc5622", "6.4 GB"),
         Remote("", "ILSVRC2012_devkit_t12.tar.gz", "md5:fa75699e90414af021442c21a62c3abf", "2.5 MB")),
        _build_imagenet),
    Source(
        "imagenet_seg", "ImageNet-segmentation (Guillaumin, Kuettel & Ferrari, IJCV 2014; Chefer et al. 2021's set)",
        "http://calvin-vision.net/bigstuff/proj-imagenet/ (linked from hila-chefer/Transformer-Explainability's README)",
        "no licence is stated with the file; the images are ImageNet's (ImageNet terms of access: non-commercial "
        "research and education). Cite Guillaumin et al. 2014.",
        "one .mat file (size not published)",
        ("gtsegs_ijcv.mat", PROVENANCE_FILE),
        (Remote("http://calvin-vision.net/bigstuff/proj-imagenet/data/gtsegs_ijcv.mat", "gtsegs_ijcv.mat", None,
                "size not published"),),
        _build_imagenet_seg),
)}


def default_root(name: str) -> Path:
    """The root the experiments read for ``name``: ``dataset_roots.<name>`` of conf/config.yaml
    (``$CLIP_XAI_DATA/<name>``, or ``data/<name>`` when the variable is unset)."""
    from omegaconf import OmegaConf

    from clip_xai.paths import CONF_DIR

    cfg = OmegaConf.load(Path(CONF_DIR) / "config.yaml")
    root = OmegaConf.select(cfg, f"dataset_roots.{name}")
    if root is None:
        raise ClipXaiError(f"conf/config.yaml has no dataset_roots.{name}", "pass --root DIR")
    return Path(str(root)).expanduser().resolve()


def prepare(name: str, root: Path | None, opts: Options) -> Report:
    """Fetch, unpack and arrange dataset ``name`` under ``root``; return the full verify report."""
    if name not in SOURCES:
        raise ClipXaiError(f"unknown dataset {name!r}", f"choose one of {sorted(SOURCES)}")
    src = SOURCES[name]
    root = Path(root).expanduser().resolve() if root is not None else default_root(name)
    print(src.banner(root, _remotes(src, opts)))
    present = [e for e in src.entries if (root / e).exists()]
    if present and not opts.force:
        try:
            rep = verify(name, root, deep=False)
        except ClipXaiError:
            rep = None
        if rep is not None and rep.ok:
            print(f"{name} is already prepared at {root} (counts match); `--force` rebuilds it")
            return verify(name, root, workers=opts.workers)
        raise ClipXaiError(f"{root} already holds {', '.join(present)} that do not pass the checks",
                           f"run `python -m clip_xai.data verify {name} --root {root}` to see why, or re-run "
                           "prepare with --force to replace them (downloads already finished are reused)")
    with Staging(root) as stage:
        entries = src.build(src, root, opts, stage)
        stage.commit(entries)
    if not opts.keep_archives and name != "cc":  # cc keeps its 2.6 MB list for incremental re-runs
        for r in src.remotes:
            if (root / DOWNLOADS / r.fname).is_file():
                (root / DOWNLOADS / r.fname).unlink()
        if (root / DOWNLOADS).is_dir() and not any((root / DOWNLOADS).iterdir()):
            (root / DOWNLOADS).rmdir()
    return verify(name, root, workers=opts.workers)
