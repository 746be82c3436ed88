"""RIVAL10 (Moayeri et al., CVPR 2022): 10 classes with object segmentations, read from the official unzip."""
from __future__ import annotations

import base64
import io
import logging
import pickle
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from clip_xai.data.base import BadImagePolicy, ImageCaptionDataset, Record, resolve_root, root_error
from clip_xai.errors import ClipXaiError

log = logging.getLogger(__name__)

RIVAL10_CLASSES: list[str] = ["truck", "car", "plane", "ship", "cat", "dog", "equine", "deer", "frog", "bird"]
# ImageNet wnid -> RIVAL10 class index (two source synsets per class; see DATASETS.md).
RIVAL10_WNIDS: dict[str, int] = {
    "n03796401": 0, "n04467665": 0,  # moving van, trailer truck
    "n02814533": 1, "n03100240": 1,  # beach wagon, convertible
    "n02690373": 2, "n04552348": 2,  # airliner, warplane
    "n03673027": 3, "n03095699": 3,  # liner, container ship
    "n02123394": 4, "n02124075": 4,  # Persian, Egyptian cat
    "n02099712": 5, "n02099601": 5,  # Labrador, golden retriever
    "n02389026": 6, "n02391049": 6,  # sorrel, zebra
    "n02423022": 7, "n02422699": 7,  # gazelle, impala
    "n01644900": 8, "n01644373": 8,  # tailed frog, tree frog
    "n01531178": 9, "n01532829": 9,  # goldfinch, house finch
}
RIVAL10_ATTRIBUTES: list[str] = [
    "long-snout", "wings", "wheels", "text", "horns", "floppy-ears", "ears", "colored-eyes", "tail",
    "mane", "beak", "hairy", "metallic", "rectangular", "wet", "long", "tall", "patterned",
]
_LAYOUT = "RIVAL10/{split}/ordinary/<wnid>_<id>.JPEG with <stem>_attr_dict.pkl / <stem>_merged_mask.JPEG beside it"


def mask_choice(name: str) -> str:
    """Validate ``dataset.mask`` / ``metrics.mask``; attribute names may use ``_`` for ``-``."""
    key = str(name).replace("_", "-")
    if key in ("entire-object", "auto", "merged"):
        return key.replace("-", "_")
    if key in RIVAL10_ATTRIBUTES:
        return key
    raise ClipXaiError(f"unknown RIVAL10 mask {name!r}",
                       f"use mask=entire_object, merged or an attribute: {', '.join(RIVAL10_ATTRIBUTES)}")


def _decode(entry) -> np.ndarray:
    if isinstance(entry, (str, bytes)):
        with Image.open(io.BytesIO(base64.b64decode(entry))) as m:
            entry = np.asarray(m.convert("L"))
    return np.asarray(entry) > 0


def load_rival10_mask(stem_path: str, threshold: int = 0, which: str = "auto") -> np.ndarray | None:
    """One image's mask, chosen by ``which`` (see :func:`mask_choice`).

    ``auto``: `entire-object` from the attr pickle, else the merged mask > threshold, else None.
    ``entire_object`` / an attribute: that entry of the attr pickle; ``merged``: the merged mask.
    None when the file that holds the chosen mask is missing; an all-False mask when the pickle
    has no entry for it (the attribute is absent from the image), which the localisation study
    flags as ``empty_mask``.
    """
    pkl, merged = Path(stem_path + "_attr_dict.pkl"), Path(stem_path + "_merged_mask.JPEG")
    if which != "merged" and pkl.is_file():
        try:
            with pkl.open("rb") as f:
                masks = pickle.load(f)
        except (pickle.UnpicklingError, AttributeError, ImportError, IndexError, EOFError) as exc:
            raise ValueError(f"unreadable mask pickle {pkl}: {exc}") from exc
        key = "entire-object" if which in ("auto", "entire_object") else which
        entry = masks.get(key)
        if entry is not None:
            return _decode(entry)
        if which != "auto":
            return np.zeros((1, 1), dtype=bool)  # resized to the image: no object pixels
    if which in ("auto", "merged") and merged.is_file():
        with Image.open(merged) as m:
            return np.asarray(m.convert("L")) > threshold
    return None


class Rival10Dataset(ImageCaptionDataset):
    """RIVAL10 `ordinary` images with class label, prompt caption and object mask when present.

    `mask` picks the mask (:func:`mask_choice`: ``auto`` = `entire-object`, else the merged mask;
    ``entire_object``; ``merged``; or an attribute such as ``wings``). `root` may be the `RIVAL10`
    folder or its parent. Images whose wnid is not one of the 20
    RIVAL10 source synsets are ignored with a warning. `classnames` follows RIVAL10_CLASSES.
    """

    has_masks = True  # the localisation study needs object masks (checked at start-up)

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        prompt: str = "a photo of a {}",
        mask_threshold: int = 0,
        mask: str = "auto",
        *,
        image_size: int = 224,
        preprocess: dict | None = None,
        limit: int | None = None,
        subset_seed: int = 0,
        on_bad_image: BadImagePolicy = "skip",
    ):
        self.mask = mask_choice(mask)
        base = resolve_root(root)
        folder = next((d for d in (base / split / "ordinary", base / "RIVAL10" / split / "ordinary") if d.is_dir()), None)
        if folder is None:
            if split not in ("train", "test"):
                raise ClipXaiError(f"unknown RIVAL10 split {split!r}", "set `dataset.split=test` or `dataset.split=train`")
            raise root_error(base / split / "ordinary", _LAYOUT.format(split=split), "dataset.root=/path/to/RIVAL10")
        records, unknown = [], 0
        for path in sorted(p for p in folder.glob("*.JPEG") if not p.name.endswith("_merged_mask.JPEG")):
            label = RIVAL10_WNIDS.get(path.stem.split("_")[0])
            if label is None:
                unknown += 1
                continue
            mask = partial(load_rival10_mask, str(path.with_suffix("")), mask_threshold, self.mask)
            records.append(Record(path.stem, path, prompt.format(RIVAL10_CLASSES[label]), label, mask))
        if unknown:
            log.warning("ignored %d image(s) in %s whose wnid is not a RIVAL10 class", unknown, folder)
        super().__init__(
            records, image_size=image_size, preprocess=preprocess, limit=limit, subset_seed=subset_seed,
            on_bad_image=on_bad_image, classnames=list(RIVAL10_CLASSES), where=str(folder),
        )
