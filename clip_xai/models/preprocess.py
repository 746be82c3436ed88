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
