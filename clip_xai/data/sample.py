"""Built-in offline sample set: real photos shipped inside scikit-image's wheel."""
from __future__ import annotations

import logging

import numpy as np

from clip_xai.data.base import BadImagePolicy, ImageCaptionDataset, Record
from clip_xai.errors import ClipXaiError

log = logging.getLogger(__name__)

# skimage.data name -> caption, in the fixed dataset order.
SAMPLE_CAPTIONS: dict[str, str] = {
    "astronaut": "a photo of an astronaut",
    "chelsea": "a photo of a cat",
    "coffee": "a photo of a cup of coffee",
    "rocket": "a photo of a rocket",
    "horse": "a photo of a horse",
    "camera": "a photo of a cameraman",
    "stereo_motorcycle": "a photo of a motorcycle",
    "page": "a photo of a page of text",
    "clock": "a photo of a clock",
    "coins": "a photo of coins",
}


def _load_skimage(name: str) -> np.ndarray:
    """Load one `skimage.data` image as (H,W,3) uint8 (left view for stereo pairs, gray/binary → RGB)."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    if isinstance(arr, tuple):  # stereo_motorcycle -> (left, right, disparity)
        arr = arr[0]
    arr = np.asarray(arr)
    if arr.dtype == bool:  # horse: binary silhouette
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


class SampleDataset(ImageCaptionDataset):
    """Ten real photos from `skimage.data` with short captions: the offline default and demo set.

    With scikit-image 0.26 all ten load from the wheel with no network: astronaut, chelsea,
    coffee, rocket, horse (binary silhouette, as RGB), camera, stereo_motorcycle (left view),
    page, clock, coins. Names that would need a pooch download elsewhere are skipped with a
    warning. Order is fixed (the order above); labels are -1; sample_id is the skimage name.
    """

    def __init__(
        self,
        names: list[str] | None = None,
        *,
        image_size: int = 224,
        preprocess: dict | None = None,
        limit: int | None = None,
        subset_seed: int = 0,
        on_bad_image: BadImagePolicy = "skip",
    ):
        names = list(SAMPLE_CAPTIONS) if names is None else list(names)
        unknown = [n for n in names if n not in SAMPLE_CAPTIONS]
        if unknown:
            raise ClipXaiError(
                f"unknown sample image(s) {unknown}",
                f"choose from {list(SAMPLE_CAPTIONS)} or leave `dataset.names=null`",
            )
        records = []
        for name in names:
            try:
                records.append(Record(name, _load_skimage(name), SAMPLE_CAPTIONS[name]))
            except Exception as exc:  # noqa: BLE001 - data may need a download that fails offline
                log.warning("sample image %r is unavailable offline, skipping it: %s", name, exc)
        super().__init__(
            records, image_size=image_size, preprocess=preprocess, limit=limit, subset_seed=subset_seed,
            on_bad_image=on_bad_image, where="skimage.data",
        )
