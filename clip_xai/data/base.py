"""Shared dataset machinery: records, the model's preprocessing, bad-image policy, subset, collate."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from clip_xai.errors import ClipXaiError
from clip_xai.models.preprocess import Preprocess
from clip_xai.types import Batch

log = logging.getLogger(__name__)

ImageSource = Union[Path, str, np.ndarray, Image.Image, Callable[[], np.ndarray]]  # callable: read lazily
MaskSource = Union[np.ndarray, Callable[[], "np.ndarray | None"], None]
BadImagePolicy = Literal["skip", "error"]
# Exceptions PIL/numpy raise for missing, truncated or undecodable files.
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Record:
    """One sample before loading: id, image (path, in-memory or a picklable zero-arg reader), caption,
    label, optional mask source."""

    sample_id: str
    image: ImageSource
    caption: str
    label: int = -1
    mask: MaskSource = None  # (H,W) bool array, or a picklable zero-arg callable returning one/None


def root_error(path: Path, layout: str, setting: str = "dataset.root=/path/to/data") -> ClipXaiError:
    """Error for a missing root dir or required file: names the path, the expected layout and the fix."""
    return ClipXaiError(
        f"dataset path not found: {path} (expected layout: {layout})",
        f"point the config at the downloaded data with `{setting}`, or use `dataset=sample` for offline use",
    )


def resolve_root(root: str | Path) -> Path:
    """Expand `~` and make a user-given root path absolute (Hydra passes strings)."""
    return Path(root).expanduser().resolve()


def load_rgb(source: ImageSource) -> Image.Image:
    """Decode an image source to an RGB PIL image (raises the underlying read error on failure);
    a zero-arg callable (e.g. a reader of one entry of an HDF5 file) is called first."""
    if callable(source) and not isinstance(source, (str, Path, Image.Image)):
        source = source()
    if isinstance(source, np.ndarray):
        arr = source
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        img = Image.fromarray(arr)
    elif isinstance(source, Image.Image):
        img = source
    else:
        with Image.open(source) as opened:
            opened.load()
            img = opened.copy()
    if img.mode == "P":  # palette PNGs with transparency warn unless routed via RGBA
        img = img.convert("RGBA")
    return img.convert("RGB")


class ImageCaptionDataset(Dataset):
    """Map-style dataset over `Record`s giving [0,1] pixels in the model's own geometry (``preprocess``:
    resize mode, interpolation, crop or pad) plus caption/label/mask."""

    def __init__(
        self,
        records: Sequence[Record],
        *,
        image_size: int = 224,
        preprocess: dict | None = None,
        limit: int | None = None,
        subset_seed: int = 0,
        on_bad_image: BadImagePolicy = "skip",
        classnames: list[str] | None = None,
        where: str = "",
    ):
        if on_bad_image not in ("skip", "error"):
            raise ClipXaiError(
                f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}",
                "set `dataset.on_bad_image=skip` (drop unreadable images) or `dataset.on_bad_image=error`",
            )
        if int(image_size) < 1:
            raise ClipXaiError(f"image_size must be positive, got {image_size}", "set `dataset.image_size=224`")
        if limit is not None and int(limit) < 1:
            raise ClipXaiError(f"limit must be >= 1 or null, got {limit}", "set `dataset.limit=null` to keep all samples")
        if len(records) == 0:
            raise ClipXaiError(
                f"the dataset is empty: no samples found{' in ' + where if where else ''}",
                "check that `dataset.root` points at the downloaded data (and the split exists), "
                "or use `dataset=sample` for offline use",
            )
        self.image_size = int(image_size)
        #: the model's own resize mode, interpolation and crop/pad (``model.preprocess``; None = OpenAI CLIP's)
        self.preprocess = Preprocess.from_config(self.image_size, preprocess)
        self.on_bad_image = on_bad_image
        self.classnames = classnames
        self.total_available = len(records)
        self.records: list[Record] = [records[i] for i in subset_indices(len(records), limit, subset_seed)]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def sample_ids(self) -> list[str]:
        """Ids of the samples in dataset order."""
        return [r.sample_id for r in self.records]

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        item: dict[str, Any] = {"sample_id": rec.sample_id, "caption": rec.caption, "label": rec.label}
        try:
            img = load_rgb(rec.image)
            mask = rec.mask() if callable(rec.mask) else rec.mask
        except _READ_ERRORS as exc:
            name = rec.image if isinstance(rec.image, (str, Path)) else rec.sample_id
            if self.on_bad_image == "error":
                raise ClipXaiError(
                    f"cannot read image {name} (sample {rec.sample_id}): {type(exc).__name__}: {exc}",
                    "remove or re-download that file, or set `dataset.on_bad_image=skip` to skip bad images",
                ) from exc
            log.warning("skipping unreadable image %s (sample %s): %s: %s", name, rec.sample_id, type(exc).__name__, exc)
            s = self.image_size
            return {**item, "pixels": torch.zeros(3, s, s), "object_mask": None, "ok": False}
        item["pixels"] = self._preprocess(img)
        item["object_mask"] = None if mask is None else self._preprocess_mask(np.asarray(mask), img.size)
        item["ok"] = True
        return item

    def own_size_image(self, record: Record) -> ImageSource | None:
        """``record``'s image before the model's resize and crop, for protocols that work at the
        image's own size (deletion/insertion decodes it again); None when the dataset holds only
        pixels at the model's input size. A file-backed dataset's record already is that source."""
        return record.image

    def _preprocess(self, img: Image.Image) -> torch.Tensor:
        """The model's preprocessing without normalisation (:meth:`Preprocess.pixels`): [0,1] pixels."""
        return self.preprocess.pixels(img)

    def _preprocess_mask(self, mask: np.ndarray, image_wh: tuple[int, int]) -> torch.Tensor:
        """Same geometry as the image for a (H,W) mask (:meth:`Preprocess.mask`)."""
        return self.preprocess.mask(mask, image_wh)


def subset_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """Seeded random subset of range(n) of size `limit`, sorted so dataset order stays stable."""
    if limit is None or int(limit) >= n:
        return list(range(n))
    gen = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(n, generator=gen)[: int(limit)].tolist())


class PinnableBatch(Batch):
    """`Batch` that DataLoader(pin_memory=True) can pin (torch only pins objects with `pin_memory()`)."""

    def pin_memory(self) -> "PinnableBatch":
        """Copy with page-locked tensors for faster host→GPU transfer."""
        masks = None if self.object_masks is None else self.object_masks.pin_memory()
        return dataclasses.replace(self, pixels=self.pixels.pin_memory(), labels=self.labels.pin_memory(), object_masks=masks)


def collate(items: list[dict[str, Any]]) -> tuple[Batch, int, list[str]]:
    """Stack ok items into a `Batch`; returns (batch, number skipped, ids skipped) so studies can log them."""
    good = [it for it in items if it["ok"]]
    skipped = [it["sample_id"] for it in items if not it["ok"]]
    if good:
        pixels = torch.stack([it["pixels"] for it in good])
    else:
        size = items[0]["pixels"].shape[-1] if items else 0
        pixels = torch.zeros(0, 3, size, size)
    masks = [it["object_mask"] for it in good]
    object_masks = torch.stack(masks) if good and all(m is not None for m in masks) else None
    batch = PinnableBatch(
        sample_ids=[it["sample_id"] for it in good],
        pixels=pixels,
        captions=[it["caption"] for it in good],
        labels=torch.tensor([it["label"] for it in good], dtype=torch.long),
        object_masks=object_masks,
    )
    return batch, len(skipped), skipped


def make_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Deterministic-order DataLoader (no shuffle) yielding `collate` tuples."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate,
        persistent_workers=False,
    )
