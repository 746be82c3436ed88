"""ImageNet (ILSVRC-2012) in torchvision's ImageFolder layout, with CLIP class names for prompts."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from clip_xai.data.base import BadImagePolicy, ImageCaptionDataset, Record, resolve_root, root_error

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png"}
_WNID = re.compile(r"n\d{8}")
_LAYOUT = "{split}/<wnid>/*.JPEG (torchvision ImageFolder)"


def _clip_classnames() -> list[str]:
    """The 1000 CLIP ImageNet class names, indexed by standard (sorted-wnid) class index."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def _read_synset_mapping(path: Path) -> list[tuple[str, str]]:
    """Parse LOC_synset_mapping.txt lines `<wnid> <name>, <synonym>, ...` into (wnid, first name)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        wnid, _, names = line.strip().partition(" ")
        if wnid:
            rows.append((wnid, names.split(",")[0].strip() or wnid))
    return rows


def imagenet_classnames(wnids: list[str], search_dirs: list[Path]) -> list[str]:
    """Class name per wnid, by the rule documented on `ImageNetDataset` (warns when it falls back)."""
    clip = _clip_classnames()
    if len(wnids) == len(clip) and all(_WNID.fullmatch(w) for w in wnids):
        return [clip[i] for i in range(len(wnids))]  # all 1000 present: sorted position = standard index
    mapping_file = next((d / "LOC_synset_mapping.txt" for d in search_dirs if (d / "LOC_synset_mapping.txt").is_file()), None)
    if mapping_file is not None:
        rows = _read_synset_mapping(mapping_file)
        order = [w for w, _ in rows]
        if len(rows) == len(clip) and order == sorted(order):  # the standard list: use CLIP's names
            index = {w: i for i, w in enumerate(order)}
            if all(w in index for w in wnids):
                return [clip[index[w]] for w in wnids]
        log.warning("ImageNet class names for the prompts come from %s, not CLIP's list", mapping_file)
        names = dict(rows)
        return [names.get(w, w) for w in wnids]
    log.warning(
        "only %d of 1000 ImageNet class folders present and no LOC_synset_mapping.txt: prompts use the wnid "
        "as class name; put LOC_synset_mapping.txt in dataset.root to get real names", len(wnids),
    )
    return list(wnids)


class ImageNetDataset(ImageCaptionDataset):
    """ImageNet `val/<wnid>/*.JPEG` with label = index of the wnid among the sorted folders present.

    Class-name rule: all 1000 wnid folders present -> CLIP's names by sorted position; else, with
    `LOC_synset_mapping.txt` in root (or its parent), CLIP's names via that file's standard order
    (or the file's own first names if it is not the standard 1000-line list); else the wnid. Any
    fallback to non-CLIP names is reported with a warning. `root` may also be the val dir itself.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        prompt: str = "a photo of a {}",
        *,
        image_size: int = 224,
        preprocess: dict | None = None,
        limit: int | None = None,
        subset_seed: int = 0,
        on_bad_image: BadImagePolicy = "skip",
    ):
        base = resolve_root(root)
        if (base / split).is_dir():
            folder = base / split
        elif base.is_dir() and any(_WNID.fullmatch(d.name) for d in base.iterdir() if d.is_dir()):
            folder = base
        else:
            raise root_error(base / split, _LAYOUT.format(split=split), "dataset.root=/path/to/imagenet")
        classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        names = imagenet_classnames(classes, [base, folder, folder.parent]) if classes else []
        records = []
        for label, wnid in enumerate(classes):
            caption = prompt.format(names[label])
            for path in sorted(p for p in (folder / wnid).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
                records.append(Record(f"{wnid}/{path.stem}", path, caption, label))
        self.wnids = classes
        super().__init__(
            records, image_size=image_size, preprocess=preprocess, limit=limit, subset_seed=subset_seed,
            on_bad_image=on_bad_image, classnames=names, where=str(folder),
        )
