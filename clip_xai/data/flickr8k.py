"""Flickr8k: images from `Flicker8k_Dataset/`, captions and split lists from `Flickr8k_text/`."""
from __future__ import annotations

import logging
from pathlib import Path

from clip_xai.data.base import BadImagePolicy, ImageCaptionDataset, Record, resolve_root, root_error
from clip_xai.errors import ClipXaiError

log = logging.getLogger(__name__)

SPLITS = ("test", "train", "dev", "all")
_LAYOUT = ("Flicker8k_Dataset/*.jpg plus Flickr8k_text/Flickr8k.token.txt and "
           "Flickr8k_text/Flickr_8k.{split}Images.txt")


def read_flickr8k_tokens(path: Path) -> dict[str, dict[int, str]]:
    """Parse `<image>.jpg#<k>\\t<caption>` lines into {image: {k: caption}}."""
    captions: dict[str, dict[int, str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, _, caption = line.partition("\t")
        image, _, k = key.strip().rpartition("#")
        if image and k.isdigit() and caption.strip():
            captions.setdefault(image, {})[int(k)] = caption.strip()
    return captions


class Flickr8kDataset(ImageCaptionDataset):
    """Flickr8k split images, each paired with caption number `caption_index` (0..4); labels are -1.

    split is test/train/dev (official lists) or `all` (every captioned image); sample_id is the
    image file stem. Images listed without that caption are left out with a warning.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        caption_index: int = 0,
        *,
        image_size: int = 224,
        preprocess: dict | None = None,
        limit: int | None = None,
        subset_seed: int = 0,
        on_bad_image: BadImagePolicy = "skip",
    ):
        if split not in SPLITS:
            raise ClipXaiError(f"unknown Flickr8k split {split!r}", f"set `dataset.split` to one of {list(SPLITS)}")
        base = resolve_root(root)
        layout = _LAYOUT.format(split=split)
        images = next((d for d in (base / "Flicker8k_Dataset", base / "Flickr8k_Dataset") if d.is_dir()), None)
        if images is None:
            raise root_error(base / "Flicker8k_Dataset", layout, "dataset.root=/path/to/flickr8k")
        token_file = base / "Flickr8k_text" / "Flickr8k.token.txt"
        if not token_file.is_file():
            raise root_error(token_file, layout, "dataset.root=/path/to/flickr8k")
        captions = read_flickr8k_tokens(token_file)
        if split == "all":
            names = sorted(captions)
        else:
            split_file = base / "Flickr8k_text" / f"Flickr_8k.{split}Images.txt"
            if not split_file.is_file():
                raise root_error(split_file, layout, "dataset.root=/path/to/flickr8k")
            names = [n.strip() for n in split_file.read_text(encoding="utf-8").splitlines() if n.strip()]
        records, missing = [], 0
        for name in names:
            caption = captions.get(name, {}).get(caption_index)
            if caption is None:
                missing += 1
                continue
            records.append(Record(Path(name).stem, images / name, caption))
        if missing:
            log.warning("left out %d Flickr8k image(s) with no caption #%d in %s", missing, caption_index, token_file)
        super().__init__(
            records, image_size=image_size, preprocess=preprocess, limit=limit, subset_seed=subset_seed,
            on_bad_image=on_bad_image, where=str(images),
        )
