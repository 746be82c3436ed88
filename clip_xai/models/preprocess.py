"""A model's own image preprocessing: resize mode, interpolation, crop or pad, and mean/std.

The dataset transform (:class:`clip_xai.data.base.ImageCaptionDataset`) turns an image into
[0,1] pixels with :meth:`Preprocess.pixels` and the tower normalises them with
:meth:`Preprocess.normalise` (explanations and perturbations work on [0,1] pixels, between the
two). Together the two steps equal the model's own ``preprocess`` transform; for open_clip models
that is ``open_clip.image_transform`` of the pretrained tag's config
(``open_clip.pretrained.get_pretrained_cfg``): OpenAI and most LAION/DataComp tags resize the
shorter side bicubically and centre-crop with CLIP's mean/std; SigLIP/SigLIP2 (``webli``) squash
to the square with mean = std = 0.5; CLIPA and others use bilinear interpolation and other
statistics. The resolved setting is ``model.preprocess`` in every run's ``config.yaml``.

Resize modes (as open_clip's eval transform): ``shortest`` = shorter side to ``size`` keeping the
aspect ratio, then centre crop; ``squash`` = both sides to ``size`` (aspect ratio not kept);
``longest`` = longer side to ``size`` keeping the aspect ratio, then centre pad with
``fill_color``. Masks follow the same geometry with nearest-neighbour resizing.

Keep-size input (``model.keep_size=true``; Grad-ECLIP's evaluation, Cyang-Zhao/Grad-Eclip
``imagenet_eval_deletion.py`` / ``imagenet_eval_insertion.py`` and ``imgprocess_keepsize`` in
``generate_emap.py``): :func:`cap_short_side` first (a shorter side above 640 px is scaled to 640,
each side truncated to an integer, PIL bicubic), then :func:`keep_size_pixels` (each side to the
nearest multiple of the patch size, halves rounded up, bicubic, no crop). Maps are then resized to
the capped image's size, not to the rounded one (:func:`keep_size_shape` gives both).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode

from clip_xai.errors import ClipXaiError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("shortest", "squash", "longest")
INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
FIX = "set model.preprocess to {resize_mode: shortest|squash|longest, interpolation: bicubic|bilinear, " \
      "mean: [r, g, b], std: [r, g, b], fill_color: 0}"


@dataclass(frozen=True)
class Preprocess:
    """One model's image preprocessing at input side ``size`` (see module docstring)."""

    size: int = 224
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    fill_color: int = 0

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ClipXaiError(f"model.preprocess.resize_mode={self.resize_mode!r} is not known", FIX)
        if self.interpolation not in INTERPOLATIONS:
            raise ClipXaiError(f"model.preprocess.interpolation={self.interpolation!r} is not known", FIX)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ClipXaiError(f"model.preprocess mean={list(self.mean)} / std={list(self.std)} are not three "
                               "values (std > 0)", FIX)

    @classmethod
    def from_config(cls, size: int, cfg: Mapping[str, Any] | None) -> Preprocess:
        """From a ``model.preprocess`` mapping (None: OpenAI CLIP's preprocessing) at ``size``."""
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - {"resize_mode", "interpolation", "mean", "std", "fill_color"})
        if unknown:
            raise ClipXaiError(f"model.preprocess has unknown keys {unknown}", FIX)
        mean, std = cfg.pop("mean", OPENAI_MEAN), cfg.pop("std", OPENAI_STD)
        mean = (mean,) * 3 if isinstance(mean, (int, float)) else mean
        std = (std,) * 3 if isinstance(std, (int, float)) else std
        return cls(size=int(size), mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
                   **{k: v for k, v in cfg.items() if v is not None})

    def as_config(self) -> dict:
        """The ``model.preprocess`` mapping (without the size, which is ``model.image_size``)."""
        d = asdict(self)
        d.pop("size")
        return {**d, "mean": list(d["mean"]), "std": list(d["std"])}

    def _geometry(self, img: Image.Image, mode: InterpolationMode, fill: int) -> Image.Image:
        s = self.size
        if self.resize_mode == "squash":
            return TF.resize(img, [s, s], interpolation=mode, antialias=True)
        if self.resize_mode == "shortest":
            img = TF.resize(img, s, interpolation=mode, antialias=True)
            return TF.center_crop(img, [s, s])
        w, h = img.size  # longest: as open_clip's ResizeKeepRatio(longest=1) + CenterCropOrPad
        ratio = max(h / s, w / s)
        img = TF.resize(img, [round(h / ratio), round(w / ratio)], interpolation=mode, antialias=True)
        w, h = img.size
        pad = [(s - w) // 2, (s - h) // 2, (s - w + 1) // 2, (s - h + 1) // 2]
        return TF.center_crop(TF.pad(img, [max(p, 0) for p in pad], fill=fill), [s, s])

    def pixels(self, img: Image.Image) -> Tensor:
        """(3, size, size) float [0,1] pixels of an RGB image, before normalisation."""
        img = self._geometry(img, INTERPOLATIONS[self.interpolation], self.fill_color)
        return TF.pil_to_tensor(img).float().div_(255.0)

    def mask(self, mask: np.ndarray, image_wh: tuple[int, int]) -> Tensor:
        """(size, size) bool mask with the image's geometry (nearest; resized to the image first
        if its size differs; padding is not object)."""
        m = Image.fromarray(mask.astype(bool).astype(np.uint8) * 255)
        if m.size != image_wh:
            m = m.resize(image_wh, Image.NEAREST)
        return TF.pil_to_tensor(self._geometry(m, InterpolationMode.NEAREST, 0))[0] > 127

    def normalise(self, pixels: Tensor) -> Tensor:
        """(pixels - mean) / std on (B, 3, H, W) [0,1] pixels."""
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / std


#: Grad-ECLIP's evaluation caps the shorter image side at this many pixels before anything else.
GE_MAX_SHORT_SIDE = 640


def cap_short_side(img: Image.Image, max_short_side: int | None = GE_MAX_SHORT_SIDE) -> Image.Image:
    """``img`` with its shorter side scaled down to ``max_short_side`` when it is longer (None: never),
    as the Grad-ECLIP evaluation scripts do: scale = short / cap, each side ``int(side / scale)``
    (truncated), PIL bicubic (``Image.resize``'s default filter for RGB since Pillow 7)."""
    w, h = img.size
    if max_short_side is None or min(w, h) <= max_short_side:
        return img
    scale = min(w, h) / max_short_side
    return img.resize((int(w / scale), int(h / scale)), Image.BICUBIC)


def keep_size_shape(h: int, w: int, patch_size: int) -> tuple[int, int]:
    """(H, W) rounded to the nearest multiples of ``patch_size``, halves rounded up (``int(x/p + 0.5)·p``,
    Grad-ECLIP's ``imgprocess_keepsize``); one clear error when a side would round to zero."""
    nh, nw = (int(side / patch_size + 0.5) * patch_size for side in (h, w))
    if nh == 0 or nw == 0:
        raise ClipXaiError(f"a {h}×{w} image is smaller than half a {patch_size}-pixel patch on one side",
                           f"use images with both sides at least {(patch_size + 1) // 2} pixels")
    return nh, nw


def keep_size_pixels(img: Image.Image, patch_size: int) -> Tensor:
    """(3, H', W') [0,1] pixels of an RGB image resized (bicubic, antialiased as PIL does, no crop) so
    each side is the nearest multiple of ``patch_size`` (:func:`keep_size_shape`): the geometry of
    Grad-ECLIP's ``imgprocess_keepsize``; the tower normalises them. Apply :func:`cap_short_side`
    first to follow the evaluation scripts."""
    nh, nw = keep_size_shape(img.height, img.width, int(patch_size))
    img = TF.resize(img.convert("RGB"), [nh, nw], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.pil_to_tensor(img).float().div_(255.0)
