"""Pixels already in memory as a dataset, so the study loops run on images a caller holds in Python.

The Python API (:mod:`clip_xai.api`) preprocesses the caller's images once (the same resize and
centre crop as every file-backed dataset) and hands the studies this dataset: the loop, rows,
summary and result files are then exactly the command line's. When the caller gave PIL images
or file paths, the dataset also keeps each one as its ``source``, so a protocol that works at the
image's own size (deletion/insertion) gets the image itself rather than the 224 crop.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from clip_xai.data.base import ImageCaptionDataset, ImageSource, Record
from clip_xai.errors import ClipXaiError


class PixelDataset(ImageCaptionDataset):
    """(N,3,S,S) float pixels in [0,1] at the model's input size, one caption each.

    Each :class:`Record` holds its sample's (3,S,S) pixel tensor as its ``image``; items return it
    unchanged (no decoding, no resize: the pixels are already what the model sees). Labels are
    -1 and there are no object masks.

    ``sources`` (optional, one per sample: the PIL image or file path the pixels were made from,
    or None) are what :meth:`own_size_image` returns; a sample without one (pixels given as a
    tensor have no own size) returns None, and a protocol at the image's own size then uses the
    model-size pixels and says so (:mod:`clip_xai.studies.deletion_insertion`).
    """

    def __init__(self, pixels: Tensor, captions: Sequence[str], sample_ids: Sequence[str] | None = None,
                 sources: Sequence[ImageSource | None] | None = None):
        square = isinstance(pixels, Tensor) and pixels.dim() == 4 and pixels.shape[-1] == pixels.shape[-2]
        if not square or pixels.shape[1] != 3:
            shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
            raise ClipXaiError(f"PixelDataset needs (N,3,S,S) pixels, got {shape}",
                               "resize the images to the model's square input size first")
        ids = [str(i) for i in range(len(pixels))] if sample_ids is None else [str(s) for s in sample_ids]
        if not len(ids) == len(captions) == len(pixels):
            raise ClipXaiError(f"{len(pixels)} images, {len(captions)} captions and {len(ids)} sample ids",
                               "give exactly one caption (and id) per image")
        if len(set(ids)) != len(ids):
            raise ClipXaiError("sample ids repeat", "give every image its own sample id")
        if sources is not None and len(sources) != len(ids):
            raise ClipXaiError(f"{len(ids)} images but {len(sources)} sources",
                               "give one source (PIL image, path or None) per image, or sources=None")
        #: sample id → the image the pixels were made from (samples given as pixels only are absent)
        self.sources: dict[str, ImageSource] = {
            sid: src for sid, src in zip(ids, sources or [None] * len(ids)) if src is not None}
        pixels = pixels.detach().float().cpu()
        records = [Record(sid, px, str(cap)) for sid, px, cap in zip(ids, pixels, captions)]
        super().__init__(records, image_size=int(pixels.shape[-1]), where="the given pixels")

    def own_size_image(self, record: Record) -> ImageSource | None:
        """The PIL image or path ``record``'s pixels were made from; None for pixels given as such."""
        return self.sources.get(record.sample_id)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        return {"sample_id": rec.sample_id, "caption": rec.caption, "label": rec.label,
                "pixels": rec.image, "object_mask": None, "ok": True}


__all__ = ["PixelDataset"]
