"""ImageNet-segmentation (Guillaumin, Küttel & Ferrari, IJCV 2014): 4,276 ImageNet images with
foreground masks in one MATLAB v7.3 (HDF5) file, ``gtsegs_ijcv.mat``, the set on which Chefer et al.
2021 (and LeGrad after them) report segmentation by explanation maps.

Layout (read as hila-chefer/Transformer-Explainability's ``data/Imagenet.py`` does): ``/value/img``
and ``/value/gt`` are (N, 1) arrays of HDF5 object references, one per image; ``img[i, 0]`` points
at the image stored transposed (3, W, H) uint8, ``gt[i, 0]`` at a 1×1 cell whose ``[0, 0]`` points
at the mask stored transposed (W, H), 1 = object. The class: Chefer's loader reads none (his ViT
explains its own top class). Other projects that read this file take each image's ImageNet id from
``/value/id``, a MATLAB char array ``<wnid>_<number>`` (one reads ``/value/target`` as the wnid);
the real file could not be opened here, so :func:`read_wnids` checks rather than assumes: the first
of those fields that names a wnid for every image gives the class (docs/datasets.md).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clip_xai.data.base import BadImagePolicy, ImageCaptionDataset, Record, resolve_root
from clip_xai.errors import ClipXaiError

log = logging.getLogger(__name__)

MAT_FILE = "gtsegs_ijcv.mat"
IMAGES, MASKS = "/value/img", "/value/gt"
CLASS_FIELDS = ("/value/id", "/value/target")  # the first one that names a wnid for every image is used
LAYOUT = (f"<root>/{MAT_FILE}: a MATLAB v7.3 (HDF5) file whose {IMAGES} and {MASKS} hold one object "
          f"reference per image and {CLASS_FIELDS[0]} each image's ImageNet id (<wnid>_<number>)")
_WNID = re.compile(r"n\d{8}")
_OPEN: dict[tuple[str, int], object] = {}  # (path, pid) -> open h5py.File: one handle per worker process


def mat_path(root: str | Path) -> Path:
    """``root`` is the .mat file itself or the folder holding ``gtsegs_ijcv.mat``."""
    base = resolve_root(root)
    return base if base.suffix == ".mat" or base.is_file() else base / MAT_FILE


def _h5():
    import h5py

    return h5py


def open_mat(path: Path):
    """The HDF5 file at ``path``, checked for the layout (one `ClipXaiError` naming what is missing)."""
    h5py = _h5()
    if not path.is_file():
        raise ClipXaiError(f"imagenet_seg: {path} not found (expected layout: {LAYOUT})",
                           f"point `dataset.root` at the folder holding {MAT_FILE} or fetch it with "
                           f"`python -m clip_xai.data prepare imagenet_seg --root {path.parent}`")
    if not h5py.is_hdf5(path):
        raise ClipXaiError(f"imagenet_seg: {path} is not an HDF5 (MATLAB v7.3) file",
                           f"pass the official {MAT_FILE} (download it again if it is truncated)")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:  # truncated or damaged HDF5
        raise ClipXaiError(f"imagenet_seg: cannot open {path}: {exc}",
                           f"download {MAT_FILE} again (the file is damaged or incomplete)") from None
    missing = [k for k in (IMAGES, MASKS) if k not in f]
    if missing:
        have = sorted(f["/value"].keys()) if "/value" in f else sorted(f.keys())
        f.close()
        raise ClipXaiError(f"imagenet_seg: {path} lacks {', '.join(missing)} (it holds {have}; expected layout: {LAYOUT})",
                           f"pass the official {MAT_FILE} from Guillaumin et al. (linked from "
                           "hila-chefer/Transformer-Explainability's README)")
    if f[IMAGES].shape[0] != f[MASKS].shape[0]:
        n_img, n_gt = f[IMAGES].shape[0], f[MASKS].shape[0]
        f.close()
        raise ClipXaiError(f"imagenet_seg: {path} has {n_img} images but {n_gt} masks",
                           f"pass the official {MAT_FILE}")
    return f


def _cached(path: str):
    key = (path, os.getpid())
    if key not in _OPEN:
        _OPEN[key] = _h5().File(path, "r")
    return _OPEN[key]


def read_image(f, index: int) -> np.ndarray:
    """(H, W, 3) uint8 image ``index`` (stored transposed; a 2-D entry is a grey image)."""
    arr = np.asarray(f[f[IMAGES][index, 0]])
    arr = arr.transpose(tuple(reversed(range(arr.ndim))))
    return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr


def read_mask_raw(f, index: int) -> np.ndarray:
    """The stored (transposed, W×H) mask array of image ``index``, values as stored (a 1×1 cell
    holding a reference to it, or the array itself)."""
    cell = f[f[MASKS][index, 0]]
    return np.asarray(f[cell[0, 0]]) if cell.dtype == object else np.asarray(cell)


def read_mask(f, index: int) -> np.ndarray:
    """(H, W) bool foreground of image ``index``."""
    return read_mask_raw(f, index).T > 0


def read_chars(f, ref) -> str:
    """A MATLAB char array (uint16 codes, any shape) as a str."""
    return "".join(chr(int(c)) for c in np.asarray(f[ref]).reshape(-1, order="F") if int(c))


def read_wnids(f) -> tuple[list[str], str]:
    """(one wnid per image, the field it came from): the first of :data:`CLASS_FIELDS` whose text
    starts with a wnid for every image; a `ClipXaiError` when none does."""
    n = f[IMAGES].shape[0]
    tried = []
    for field in CLASS_FIELDS:
        if field not in f or f[field].shape[0] != n:
            tried.append(f"{field}: {'absent' if field not in f else f'{f[field].shape[0]} entries for {n} images'}")
            continue
        refs = f[field][:, 0]
        try:
            found = [_WNID.match(read_chars(f, r)) for r in refs]
        except (TypeError, ValueError, KeyError, RuntimeError) as exc:  # not references to char arrays
            tried.append(f"{field}: unreadable ({type(exc).__name__}: {exc})")
            continue
        bad = [i for i, m in enumerate(found) if m is None]
        if not bad:
            return [m.group(0) for m in found], field
        tried.append(f"{field}: {len(bad)} of {n} entries name no wnid (e.g. entry {bad[0]}: "
                     f"{read_chars(f, refs[bad[0]])!r})")
    raise ClipXaiError(f"imagenet_seg: {f.filename} does not say each image's class ({'; '.join(tried)})",
                       f"pass the official {MAT_FILE}, whose {CLASS_FIELDS[0]} holds the ImageNet image ids")


def class_names(wnids: list[str]) -> tuple[list[str], dict[str, int]]:
    """A prompt name per wnid and how many came from where: CLIP's ImageNet-1k class names
    (``open_clip.zero_shot_metadata``, indexed by timm's sorted ILSVRC-2012 wnid list) for the 1,000
    classes; else the first WordNet lemma from timm's ImageNet-21k synset table; else the wnid."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    in1k = {w: i for i, w in enumerate(ImageNetInfo("imagenet-1k").label_names())}
    lemmas = ImageNetInfo("imagenet-22k")
    known = set(lemmas.label_names())
    names, counts = [], {"clip_imagenet1k": 0, "wordnet_lemma": 0, "wnid": 0}
    for w in wnids:
        if w in in1k:
            names.append(IMAGENET_CLASSNAMES[in1k[w]])
            counts["clip_imagenet1k"] += 1
        elif w in known:
            names.append(lemmas.label_name_to_description(w).split(",")[0].strip())
            counts["wordnet_lemma"] += 1
        else:
            names.append(w)
            counts["wnid"] += 1
    return names, counts


@dataclass(frozen=True)
class MatEntry:
    """Picklable lazy reader of one image or mask of the .mat (DataLoader workers open their own handle)."""

    path: str
    index: int
    kind: str  # "img" | "gt"

    def __call__(self) -> np.ndarray:
        try:
            f = _cached(self.path)
            return read_image(f, self.index) if self.kind == "img" else read_mask(f, self.index)
        except (KeyError, TypeError, IndexError, RuntimeError) as exc:  # h5py: dangling or malformed reference
            raise ValueError(f"entry {self.index} of {self.path}: {type(exc).__name__}: {exc}") from exc


class ImageNetSegDataset(ImageCaptionDataset):
    """ImageNet-segmentation: image, foreground mask and the prompt of the image's ImageNet class.

    Sample id ``<index>_<wnid>`` (index = position in the file, 4 digits). Label = the wnid's
    position among the sorted distinct wnids of the file (``classnames`` in that order; ``wnids``
    holds them). Images and masks are read lazily from the file and go through the model's own
    preprocessing like every dataset (Chefer et al. squash to 224×224 instead: set
    ``model.preprocess.resize_mode=squash`` for that geometry). ``label_source`` says where the
    classes and their names came from (written to summary.json by the localisation study).
    """

    has_masks = True  # the localisation study needs object masks (checked at start-up)
    mask = "object"   # the mask column of the rows: the file's foreground mask

    def __init__(
        self,
        root: str | Path,
        prompt: str = "a photo of a {}",
        *,
        image_size: int = 224,
        preprocess: dict | None = None,
        limit: int | None = None,
        subset_seed: int = 0,
        on_bad_image: BadImagePolicy = "skip",
    ):
        path = mat_path(root)
        with open_mat(path) as f:
            wnids, field = read_wnids(f)
        self.wnids = sorted(set(wnids))
        names, counts = class_names(self.wnids)
        label = {w: i for i, w in enumerate(self.wnids)}
        records = [Record(f"{i:04d}_{w}", MatEntry(str(path), i, "img"), prompt.format(names[label[w]]), label[w],
                          MatEntry(str(path), i, "gt")) for i, w in enumerate(wnids)]
        self.label_source = (f"{field} of {path.name} (ImageNet image id -> wnid); names of the {len(self.wnids)} "
                             f"classes: {counts['clip_imagenet1k']} CLIP ImageNet-1k, {counts['wordnet_lemma']} "
                             f"WordNet lemma (timm), {counts['wnid']} bare wnid")
        if counts["wnid"]:
            log.warning("imagenet_seg: %d class(es) have no known name: their prompts use the wnid", counts["wnid"])
        super().__init__(
            records, image_size=image_size, preprocess=preprocess, limit=limit, subset_seed=subset_seed,
            on_bad_image=on_bad_image, classnames=names, where=str(path),
        )
