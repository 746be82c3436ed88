"""Conceptual Captions images fetched by the user: img2dataset "files" folder or an image_path,caption CSV/TSV."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

from clip_xai.data.base import BadImagePolicy, ImageCaptionDataset, Record, resolve_root, root_error
from clip_xai.errors import ClipXaiError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}
_LAYOUT = ("an img2dataset 'files' folder (<shard>/000000001.jpg + 000000001.txt caption) "
           "or a CSV/TSV file of image_path,caption")
_HEADER_PATHS = {"image_path", "image", "path", "filepath", "file", "filename", "img"}


def _records_from_folder(root: Path) -> list[Record]:
    """Records from img2dataset's sharded layout; images without a caption .txt are ignored (counted)."""
    records, uncaptioned = [], 0
    for path in sorted(p for p in root.glob("*/*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            uncaptioned += 1
            continue
        records.append(Record(path.stem, path, txt.read_text(encoding="utf-8").strip()))
    if uncaptioned:
        log.warning("ignored %d image(s) without a caption .txt under %s", uncaptioned, root)
    return records


def _records_from_table(path: Path) -> list[Record]:
    """Records from an `image_path,caption` CSV (TSV if the extension is .tsv); header optional."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f, delimiter=delimiter) if r and any(c.strip() for c in r)]
    if rows and rows[0][0].strip().lower() in _HEADER_PATHS:
        rows = rows[1:]
    bad = next((i for i, r in enumerate(rows) if len(r) < 2), None)
    if bad is not None:
        raise ClipXaiError(
            f"{path}: row {bad + 1} does not have two columns image_path{delimiter!r}caption",
            "write one `image_path,caption` row per image (tab-separated if the file ends in .tsv)",
        )
    if rows and rows[0][1].strip().lower().startswith(("http://", "https://")):
        raise ClipXaiError(
            f"{path} looks like the official caption<TAB>url list, not image_path,caption",
            "download the images first (e.g. img2dataset --output_format files) and point `dataset.root` at that folder",
        )
    records, seen = [], set()
    for image, caption, *_ in rows:
        image = image.strip()
        sample_id = image if image not in seen else f"{image}#{len(records)}"
        seen.add(image)
        records.append(Record(sample_id, (path.parent / image).resolve(), caption.strip()))
    return records


class ConceptualCaptionsDataset(ImageCaptionDataset):
    """Conceptual Captions pairs from an img2dataset folder (`root` a dir) or a CSV/TSV (`root` a file).

    Missing or unreadable images are skipped (counted by `collate`) under on_bad_image="skip".
    sample_id = the img2dataset key, or the image path as written in the CSV/TSV.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        image_size: int = 224,
        preprocess: dict | None = None,
        limit: int | None = None,
        subset_seed: int = 0,
        on_bad_image: BadImagePolicy = "skip",
    ):
        base = resolve_root(root)
        if base.is_dir():
            records = _records_from_folder(base)
        elif base.is_file():
            records = _records_from_table(base)
        else:
            raise root_error(base, _LAYOUT, "dataset.root=/path/to/cc_images_or_file.tsv")
        super().__init__(
            records, image_size=image_size, preprocess=preprocess, limit=limit, subset_seed=subset_seed,
            on_bad_image=on_bad_image, where=str(base),
        )
