"""The Python API: the command line's pipeline as six calls on images and captions held in Python.

```python
import clip_xai

model = clip_xai.load_model("tiny")  # small, RANDOM weights: "vit_b16" for real maps
maps = clip_xai.explain(model, ["cat.jpg"], ["a photo of a cat"], method="eclip")
fig = clip_xai.show(["cat.jpg"], maps, ["a photo of a cat"])
rows = clip_xai.sensitivity(model, ["cat.jpg"], ["a photo of a cat"],
                            method="eclip", eps=[4 / 255, 8 / 255])
curves = clip_xai.faithfulness_curves(model, ["cat.jpg"], labels=[0], class_names=["cat", "dog"],
                                      method="eclip", direction="positive")
```

Every default comes from the yaml files the command line composes (``conf/``, through Hydra's
compose API) and every object is built by the same code (`clip_xai.config.build`), so a call
here and ``python -m clip_xai`` with the same settings give the same numbers. A setting is passed
as a keyword: ``explain(..., method="rise", n_masks=500)`` is ``explainer=rise
explainer.n_masks=500``. [`sensitivity`][clip_xai.api.sensitivity],
[`faithfulness`][clip_xai.api.faithfulness] and [`faithfulness_curves`][clip_xai.api.faithfulness_curves]
run the studies' own loops over the given images, so their rows are the rows ``results.parquet``
would hold.

Images are PIL images or image file paths (resized and centre-cropped to the model's input size
exactly as the datasets do), or one (B,3,H,W) float tensor with values in [0,1] (resized to the
model's input size with the same bicubic filter when it is not already that size). Sample ``i``
of a call has the sample id ``str(i)`` unless ``sample_ids`` names them; with the seed, the id
seeds the sample's noise (RISE masks, bottleneck noise, noise controls, ROAD), so
[`explain`][clip_xai.api.explain], [`perturb`][clip_xai.api.perturb] and the studies agree on
one call's images.

Bad input raises `clip_xai.errors.ClipXaiError` (what is wrong and how to fix it) before any
image is decoded or any model runs.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from matplotlib.figure import Figure
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from PIL import Image
from torch import Tensor

from clip_xai.config import META_KEYS, build, pick_device, precision_scope, register_resolvers, resolve_precision
from clip_xai.data.base import ImageCaptionDataset, Record, load_rgb
from clip_xai.data.memory import PixelDataset
from clip_xai.errors import ClipXaiError
from clip_xai.explainers.postprocess import image_maps, text_maps
from clip_xai.models.base import ClipAdapter
from clip_xai.paths import CONF_DIR
from clip_xai.schema import RESULTS_FILE
from clip_xai.seeds import sample_seed
from clip_xai.types import TextTokens

log = logging.getLogger(__name__)

#: One image: a PIL image or a path to an image file.
ImageLike = Union[Image.Image, str, Path]
#: What the calls take as ``images``: one image, a list of them, or a (B,3,H,W) float tensor in [0,1].
Images = Union[ImageLike, Sequence[ImageLike], Tensor]

__all__ = ["TokenScores", "load_model", "explain", "perturb", "sensitivity", "faithfulness", "faithfulness_curves",
           "show"]

#: The curve protocols :func:`faithfulness_curves` runs: each is a ``study=`` option of the same name
#: whose rows hold one curve per sample (list columns) and its AUCs.
CURVE_PROTOCOLS = ("perturbation_curve", "deletion_insertion")
#: Each protocol's own keyword of :func:`faithfulness_curves` (its curve variant: ``study.<key>``).
_CURVE_VARIANT = {"perturbation_curve": "direction", "deletion_insertion": "mode"}

# Keys of a config option that a keyword may not set: the class, and the name the rows carry.
_FIXED_KEYS = ("_target_", "name")


@dataclass
class TokenScores:
    """Per-token scores of text maps, one entry per caption.

    Only the caption's own tokens are listed (start, end and padding tokens are not).

    Attributes:
        texts: The captions, as given.
        tokens: Per caption, its tokens as strings (the tokenizer's pieces, decoded).
        scores: Per caption, a float tensor with one score per token: min-max normalised to
            [0,1] over the caption's tokens, or, with ``raw=True``, the method's own scores.
        positions: Per caption, each token's position in the tokenised sequence.
        raw: True when ``scores`` are the method's unprocessed scores.
    """

    texts: list[str]
    tokens: list[list[str]]
    scores: list[Tensor]
    positions: list[Tensor]
    raw: bool = False

    def __len__(self) -> int:
        return len(self.texts)

    def pairs(self, i: int) -> list[tuple[str, float]]:
        """Caption ``i`` as (token, score) pairs, in caption order."""
        return list(zip(self.tokens[i], self.scores[i].tolist()))


class _NotebookFigure(Figure):
    """A matplotlib figure that a notebook shows as PNG when it ends a cell, with no pyplot state
    (pyplot's inline backend would show it a second time, and keep every figure alive)."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png")
        return buf.getvalue()


# --- configs ----------------------------------------------------------------------------------


def _options(group: str) -> list[str]:
    """The options of a config group: the yaml files under ``conf/<group>/``."""
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@functools.lru_cache(maxsize=64)
def _composed(choices: tuple[tuple[str, str], ...]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    register_resolvers()
    overrides = [f"{group}={option}" for group, option in choices] + ["logger=none"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _config(choices: dict[str, str], settings: dict[str, dict] | None = None, seed: int | None = None) -> DictConfig:
    """The config ``python -m clip_xai group=option ...`` composes, with ``settings`` (group → key →
    value) written into the chosen options and ``seed`` as the run's seed. Unknown options and keys
    are refused, naming the valid ones."""
    what = {"model": "model", "explainer": "method", "perturbation": "perturbation", "study": "study"}
    for group, option in choices.items():
        options = _options(group)
        if not isinstance(option, str) or option not in options:
            raise ClipXaiError(f"unknown {what.get(group, group)} {option!r}", f"use one of: {', '.join(options)}")
    cfg = copy.deepcopy(_composed(tuple(sorted(choices.items()))))
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ClipXaiError(f"seed must be an integer, got {seed!r}", "pass e.g. seed=0")
        cfg.seed = int(seed)
    for group, values in (settings or {}).items():
        node = cfg[group]
        allowed = [k for k in node if k not in _FIXED_KEYS + META_KEYS.get(group, ())]
        label = f"{what.get(group, group)} {choices.get(group, node.get('name', group))}"
        for key, value in values.items():
            if key not in allowed:
                raise ClipXaiError(f"{label} has no setting {key!r}", f"its settings are: {', '.join(allowed)}")
            try:
                node[key] = list(value) if isinstance(value, tuple) else value
            except (OmegaConfBaseException, ValueError) as err:
                raise ClipXaiError(f"{label}: cannot set {key}={value!r} ({type(err).__name__})",
                                   f"pass a plain number, string, bool, None or list, as in conf/{group}/") from None
    return cfg


# --- inputs -----------------------------------------------------------------------------------


def _check_model(model) -> None:
    if not isinstance(model, ClipAdapter):
        raise ClipXaiError(f"model must be a clip_xai model adapter, got {type(model).__name__}",
                           "load one with clip_xai.load_model(...)")


def _image_list(images) -> list | Tensor:
    """``images`` as a (B,3,H,W) float tensor or a list of PIL images / paths, types checked (nothing decoded)."""
    if isinstance(images, Tensor):
        px = images[None] if images.dim() == 3 else images
        if px.dim() != 4 or px.shape[1] != 3:
            raise ClipXaiError(f"an image tensor must be (B,3,H,W), got shape {tuple(images.shape)}",
                               "pass RGB pixels as a (B,3,H,W) float tensor with values in [0,1]")
        if not px.is_floating_point():
            raise ClipXaiError(f"an image tensor must hold floats in [0,1], got dtype {px.dtype}",
                               "convert it with pixels.float() / 255 for 8-bit images")
        if not bool(torch.isfinite(px).all()) or px.numel() and (float(px.min()) < 0 or float(px.max()) > 1):
            raise ClipXaiError("an image tensor must hold finite values in [0,1] (unnormalised pixels)",
                               "pass pixels before any mean/std normalisation, scaled to [0,1]")
        if len(px) == 0:
            raise ClipXaiError("no images were given", "pass at least one image")
        return px
    items = [images] if isinstance(images, (Image.Image, str, Path)) else images
    if not isinstance(items, (list, tuple)):
        raise ClipXaiError(f"images must be PIL images, image file paths or a (B,3,H,W) tensor, "
                           f"got {type(images).__name__}",
                           "pass a list of PIL images or paths, or one float tensor in [0,1]")
    if not items:
        raise ClipXaiError("no images were given", "pass at least one image")
    for i, item in enumerate(items):
        if isinstance(item, (str, Path)):
            if not Path(item).expanduser().is_file():
                raise ClipXaiError(f"image file not found: {item}", "pass the path of an existing image file")
        elif not isinstance(item, Image.Image):
            hint = ("stack tensors into one (B,3,H,W) tensor" if isinstance(item, Tensor)
                    else "convert arrays with PIL.Image.fromarray" if isinstance(item, np.ndarray)
                    else "pass PIL images, image file paths or one (B,3,H,W) float tensor in [0,1]")
            raise ClipXaiError(f"image {i} is a {type(item).__name__}, not a PIL image or a file path", hint)
    return list(items)


def _text_list(texts, n: int) -> list[str]:
    """``texts`` as a list of ``n`` strings (one caption per image)."""
    items = [texts] if isinstance(texts, str) else texts
    if not isinstance(items, (list, tuple)) or not all(isinstance(t, str) for t in items):
        raise ClipXaiError(f"texts must be a list of strings, got {type(texts).__name__}",
                           "pass one caption string per image")
    if len(items) != n:
        raise ClipXaiError(f"{n} image(s) but {len(items)} text(s)",
                           "pass exactly one text per image (repeat a caption with [caption] * n)")
    return list(items)


def _read(item: ImageLike) -> Image.Image:
    """One PIL image or file as an RGB PIL image (the datasets' decoder)."""
    try:
        return load_rgb(Path(item).expanduser() if isinstance(item, (str, Path)) else item)
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ClipXaiError(f"cannot read image {item}: {type(err).__name__}: {err}",
                           "pass a readable image file or a PIL image") from None


def _decode(items: list, size: int) -> Tensor:
    """PIL images / paths → (B,3,S,S) [0,1] pixels, with the datasets' own resize and centre crop."""
    pictures = [_read(item) for item in items]
    ds = ImageCaptionDataset([Record(str(i), p, "") for i, p in enumerate(pictures)], image_size=size,
                             on_bad_image="error")
    return torch.stack([ds[i]["pixels"] for i in range(len(ds))])


def _to_model_size(model: ClipAdapter, images: list | Tensor) -> tuple[Tensor, tuple[int, int]]:
    """(model-size pixels on the model's device, size of the given images)."""
    s = int(model.image_size)
    if isinstance(images, Tensor):
        size = (int(images.shape[-2]), int(images.shape[-1]))
        px = images.detach().float()
        if size != (s, s):
            px = F.interpolate(px, size=(s, s), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return px.to(model.device), size
    return _decode(images, s).to(model.device), (s, s)


@dataclass
class _Inputs:
    pixels: Tensor  # (B,3,S,S) on the model's device
    size: tuple[int, int]  # what image maps are returned at
    texts: list[str]
    tokens: TextTokens
    seeds: Tensor
    ids: list[str]
    sources: list | None  # the PIL images / paths as given (own size); None for a tensor


def _inputs(model: ClipAdapter, images, texts, seed: int, sample_ids: Sequence[str] | None) -> _Inputs:
    """Check, then decode and tokenise (a too-long caption is refused by the tokenizer)."""
    items = _image_list(images)
    texts = _text_list(texts, len(items))
    ids = [str(i) for i in range(len(texts))] if sample_ids is None else [str(s) for s in sample_ids]
    if len(ids) != len(texts) or len(set(ids)) != len(ids) or isinstance(sample_ids, str):
        raise ClipXaiError(f"sample_ids must be {len(texts)} distinct ids, one per image, got {sample_ids!r}",
                           "pass one id per image, or leave sample_ids=None for 0, 1, 2, ...")
    lengths = model.token_lengths(texts)
    long = [t for t, n in zip(texts, lengths) if n > model.context_length]
    if long:
        raise ClipXaiError(f"caption too long for the {model.context_length}-token context of {model.name}: "
                           f"{long[0][:80]!r}",
                           "shorten the caption")
    pixels, size = _to_model_size(model, items)
    seeds = torch.tensor([sample_seed(seed, sid) for sid in ids], dtype=torch.long)
    sources = None if isinstance(items, Tensor) else [
        Path(item).expanduser() if isinstance(item, (str, Path)) else item for item in items]
    return _Inputs(pixels, size, texts, model.tokenize(texts), seeds, ids, sources)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Torch's global generators seeded with ``seed``, as the entrypoint seeds them once per run (a
    method that draws unseeded, e.g. RISE with ``mask_seed=null``, reads them). Inside a fork of
    the generators, so the caller's random state is left as it was."""
    devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _run_scope(cfg: DictConfig, device: torch.device):
    """Global seed and numerics (``precision``) of a command-line run, around one call's work."""
    with _seeded(int(cfg.seed), device), precision_scope(device, resolve_precision(device, str(cfg.precision))):
        yield


def _build_explainer(cfg: DictConfig, model: ClipAdapter):
    explainer = build(cfg, "explainer")  # unknown modality / settings: the explainer's own error
    explainer.check_requirements(model)
    explainer.check_model(model)
    return explainer


# --- the calls --------------------------------------------------------------------------------


def load_model(name: str = "vit_b16", device: str = "auto", **overrides: Any) -> ClipAdapter:
    """Build a model exactly as ``python -m clip_xai model=NAME`` does.

    Args:
        name: Any ``model=`` option (a file in ``conf/model/``): ``tiny`` (a small RANDOM
            open_clip ViT for tests and offline use; its maps show the pipeline works, not what
            CLIP looks at), ``vit_b16``, ``vit_b32``, ``open_clip``, ``hf_clip``, ``altclip``, ...
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        **overrides: That option's keys, e.g. ``arch="ViT-L-14"``, ``pretrained="openai"`` or a
            checkpoint path, ``seed=1`` for the weights of a random model.

    Returns:
        The model adapter (a `clip_xai.models.base.ClipAdapter`) in eval mode on ``device``.

    Raises:
        ClipXaiError: Unknown option or key (the valid ones are named), weights that cannot be
            found offline, or a device that is not available.

    Example:
        >>> model = clip_xai.load_model("tiny", device="cpu")
    """
    dev = pick_device(str(device))
    cfg = _config({"model": name}, {"model": overrides})
    return build(cfg, "model").to(dev).eval()


def explain(model: ClipAdapter, images: Images, texts: str | Sequence[str], method: str = "eclip",
            modality: str = "image", raw: bool = False, *, sample_ids: Sequence[str] | None = None,
            seed: int | None = None, **params: Any) -> Tensor | TokenScores:
    """Explain image–text pairs with one method.

    Args:
        model: A model from [`load_model`][clip_xai.api.load_model].
        images: PIL images or image file paths (preprocessed as the datasets do), or a
            (B,3,H,W) float tensor with values in [0,1].
        texts: One caption per image.
        method: Any ``explainer=`` option (a file in ``conf/explainer/``): ``eclip``,
            ``gradcam``, ``rise``, ``selfattn``, ``chefer``, ``m2ib``, ...
        modality: ``image`` for maps over the image (the caption's embedding is the target),
            ``text`` for scores over the caption's tokens (the image's embedding is the target).
        raw: Return the method's own maps, before the shared post-processing.
        sample_ids: One id per image (default ``"0"``, ``"1"``, ...). With the seed it seeds each
            image's noise (RISE masks, bottleneck noise, noise controls, ROAD), as a dataset's
            sample id does on the command line; pass a run's ids to reproduce its seeded maps.
        seed: The run's seed (the command line's ``seed=``); None takes the yaml's (0).
        **params: That method's settings (its yaml keys), e.g. ``n_masks=500`` for ``rise``.

    Returns:
        For ``modality="image"``: a (B,H,W) float tensor on the CPU, each map min-max normalised
        to [0,1] and resized to the size of the given images (the model's input size for PIL
        images and paths; a constant map is all zeros and is logged as a warning). With
        ``raw=True``: the method's map as it returns it, on the patch grid (B,h,w) or at the
        model's input size, not normalised.
        For ``modality="text"``: a [`TokenScores`][clip_xai.api.TokenScores] with each
        caption's tokens and their scores.

    Raises:
        ClipXaiError: Unknown method (the options are listed) or setting, a modality the method
            has no maps for, a method the model cannot run, images of the wrong type, or a
            different number of images and texts.

    Example:
        >>> maps = clip_xai.explain(model, ["cat.jpg"], ["a photo of a cat"], method="gradcam")
        >>> maps.shape
        torch.Size([1, 224, 224])
    """
    _check_model(model)
    cfg = _config({"explainer": method}, {"explainer": {**params, "modality": modality}}, seed)
    explainer = _build_explainer(cfg, model)
    inp = _inputs(model, images, texts, int(cfg.seed), sample_ids)
    with _run_scope(cfg, model.device):
        out = explainer(model, inp.pixels, inp.tokens, inp.seeds).float()
    if explainer.modality == "text":
        scores = out if raw else text_maps(out, inp.tokens.content_mask)
        if not raw:
            _warn_flat(explainer.name, scores)
        return _token_scores(model, inp, scores, raw)
    if raw:
        return out.cpu()
    maps = image_maps(out, inp.size)
    _warn_flat(explainer.name, maps.flatten(1))
    return maps.cpu()


def _warn_flat(name: str, maps: Tensor) -> None:
    """Log maps that carry no ranking: constant ones (all zeros after min-max) and NaN ones."""
    nan = torch.isnan(maps).any(1)
    constant = ~nan & (maps.amax(1) == 0)
    for what, hit in (("constant (all zeros after min-max)", constant), ("NaN", nan)):
        if bool(hit.any()):
            log.warning("%s: %d of %d maps are %s (samples %s)", name, int(hit.sum()), len(maps), what,
                        hit.nonzero().squeeze(-1).tolist())


def _token_scores(model: ClipAdapter, inp: _Inputs, scores: Tensor, raw: bool) -> TokenScores:
    decode = _token_decoder(model)
    tokens, values, positions = [], [], []
    for i in range(len(inp.texts)):
        pos = inp.tokens.content_mask[i].nonzero().squeeze(-1)
        ids = inp.tokens.ids[i, pos].tolist()
        tokens.append([decode(t) for t in ids])
        values.append(scores[i, pos].cpu())
        positions.append(pos.cpu())
    return TokenScores(list(inp.texts), tokens, values, positions, raw)


def _token_decoder(model: ClipAdapter):
    """id → token string with the model's own tokenizer (open_clip BPE or a Hugging Face tokenizer)."""
    tok = model._tok() if hasattr(model, "_tok") else getattr(model, "_tokenizer", None)
    tok = getattr(tok, "tokenizer", tok)  # open_clip's HFTokenizer wraps a transformers tokenizer
    if not callable(getattr(tok, "decode", None)):
        raise ClipXaiError(f"cannot turn token ids into strings for model {model.name} ({type(tok).__name__})",
                           "use modality=text with an open_clip or Hugging Face model")
    pieces = getattr(tok, "convert_ids_to_tokens", None)

    def decode(i: int) -> str:
        text = tok.decode([int(i)]).strip()
        return text if text or pieces is None else str(pieces(int(i)))  # a bare word-start piece: "▁"

    return decode


def perturb(model: ClipAdapter, images: Images, texts: str | Sequence[str], kind: str = "fgsm",
            eps: float | None = None,
            *, method: str = "eclip", sample_ids: Sequence[str] | None = None, seed: int | None = None,
            **params: Any) -> Tensor:
    """Perturb images as the sensitivity study does.

    Args:
        model: A model from [`load_model`][clip_xai.api.load_model].
        images: As in [`explain`][clip_xai.api.explain].
        texts: One caption per image (the attacks move the image–text similarity).
        kind: Any ``perturbation=`` option: ``fgsm``, ``pgd``, ``noise``, ``map_attack``.
        eps: The L∞ budget in [0,1] pixel units; None takes the yaml's (0.0314 ≈ 8/255, as the
            command line does).
        method: The explainer whose map ``map_attack`` attacks (ignored by the other kinds).
        sample_ids: One id per image (default ``"0"``, ``"1"``, ...). With the seed it seeds each
            image's noise (RISE masks, bottleneck noise, noise controls, ROAD), as a dataset's
            sample id does on the command line; pass a run's ids to reproduce its seeded maps.
        seed: The run's seed (the command line's ``seed=``); None takes the yaml's (0).
        **params: That perturbation's settings, e.g. ``steps=20`` for ``pgd``, ``kind="gaussian"``
            for ``noise``, ``direction="decrease"``.

    Returns:
        A (B,3,S,S) float tensor of perturbed pixels in [0,1] on the model's device, at the
        model's input size S (the size the budget holds at).

    Raises:
        ClipXaiError: Unknown kind or setting, ``eps`` outside [0,1], bad images or texts.
    """
    _check_model(model)
    cfg = _config({"perturbation": kind, "explainer": method}, {"perturbation": _with_eps(params, eps)}, seed)
    perturbation = build(cfg, "perturbation")
    perturbation.bind(_build_explainer(cfg, model), model)
    inp = _inputs(model, images, texts, int(cfg.seed), sample_ids)
    with _run_scope(cfg, model.device):
        return perturbation(model, inp.pixels, inp.tokens, inp.seeds).detach()


def sensitivity(model: ClipAdapter, images: Images, texts: str | Sequence[str], method: str = "eclip",
                eps: float | Sequence[float] | None = None, perturbation: str = "fgsm", *,
                perturbation_params: dict | None = None, metrics_params: dict | None = None,
                sample_ids: Sequence[str] | None = None, seed: int | None = None, **params: Any) -> pd.DataFrame:
    """Run the sensitivity study (clean map vs the map of the perturbed image) on these images.

    The study's own loop runs over the images, so the rows are the rows ``results.parquet`` of
    ``python -m clip_xai study=sensitivity`` would hold (``dataset`` is ``memory``; the sample ids
    are ``sample_ids``, by default the positions ``"0"``, ``"1"``, ...). A list of ε runs one study
    per value, and the clean maps are computed once for all of them, as a command-line sweep does.

    Args:
        model: A model from [`load_model`][clip_xai.api.load_model].
        images: As in [`explain`][clip_xai.api.explain].
        texts: One caption per image.
        method: Any ``explainer=`` option.
        eps: One budget or a list of them (``perturbation.eps``); None takes the yaml's
            (0.0314 ≈ 8/255 for every perturbation, as the command line does).
        perturbation: Any ``perturbation=`` option.
        perturbation_params: That perturbation's other settings (``perturbation.*``).
        metrics_params: Settings of the sensitivity metrics (``metrics.*``, e.g. ``{"k": 50}``).
        sample_ids: One id per image (default ``"0"``, ``"1"``, ...). With the seed it seeds each
            image's noise (RISE masks, bottleneck noise, noise controls, ROAD), as a dataset's
            sample id does on the command line; pass a run's ids to reproduce its seeded maps.
        seed: The run's seed (the command line's ``seed=``); None takes the yaml's (0).
        **params: The method's settings, as in [`explain`][clip_xai.api.explain].

    Returns:
        One row per (image, ε) with the columns of
        `clip_xai.schema.SENSITIVITY_COLUMNS`. ``df.attrs["summaries"]`` holds each run's
        ``summary.json`` (means, counts of flagged maps and NaN metrics).

    Raises:
        ClipXaiError: As [`explain`][clip_xai.api.explain] and [`perturb`][clip_xai.api.perturb];
            also a text-modality method.
    """
    if "eps" in (perturbation_params or {}):
        raise ClipXaiError("perturbation_params holds 'eps'", "pass the budget as sensitivity(..., eps=...)")
    epsilons = list(eps) if isinstance(eps, (list, tuple)) else [eps]
    if not epsilons:
        raise ClipXaiError("eps is an empty list", "pass one budget or a list of them, e.g. eps=[4/255, 8/255]")
    settings = {"explainer": params, "perturbation": dict(perturbation_params or {}),
                "metrics": dict(metrics_params or {})}
    return _run_study(model, images, texts, "sensitivity", method, perturbation, settings, epsilons, sample_ids, seed)


def faithfulness(model: ClipAdapter, images: Images, texts: str | Sequence[str], method: str = "eclip", *,
                 metrics_params: dict | None = None, sample_ids: Sequence[str] | None = None, seed: int | None = None,
                 **params: Any) -> pd.DataFrame:
    """Run the faithfulness study (Confidence Drop/Increase of image and text maps, ROAD) on these images.

    Rows are those of ``python -m clip_xai study=faithfulness``'s ``results.parquet``
    (``dataset`` is ``memory``); a method with text maps is scored on both modalities.

    Args:
        model: A model from [`load_model`][clip_xai.api.load_model].
        images: As in [`explain`][clip_xai.api.explain].
        texts: One caption per image.
        method: Any ``explainer=`` option.
        metrics_params: Settings of the faithfulness metrics (``metrics.*``), e.g.
            ``{"road": False}`` to skip ROAD, ``{"road_percentages": [20, 50, 80]}``.
        sample_ids: One id per image (default ``"0"``, ``"1"``, ...). With the seed it seeds each
            image's noise (RISE masks, bottleneck noise, noise controls, ROAD), as a dataset's
            sample id does on the command line; pass a run's ids to reproduce its seeded maps.
        seed: The run's seed (the command line's ``seed=``); None takes the yaml's (0).
        **params: The method's settings, as in [`explain`][clip_xai.api.explain].

    Returns:
        One row per image with the columns of `clip_xai.schema.FAITHFULNESS_COLUMNS`;
        ``df.attrs["summaries"]`` holds the run's ``summary.json``.

    Raises:
        ClipXaiError: As [`explain`][clip_xai.api.explain].
    """
    settings = {"explainer": params, "metrics": dict(metrics_params or {})}
    return _run_study(model, images, texts, "faithfulness", method, None, settings, [None], sample_ids, seed)


def faithfulness_curves(model: ClipAdapter, images: Images, labels: Sequence[int] | None = None,
                        method: str = "eclip", *, class_names: Sequence[str] | str,
                        protocol: str = "perturbation_curve", direction: str | None = None,
                        mode: str | None = None, study_params: dict | None = None,
                        sample_ids: Sequence[str] | None = None, seed: int | None = None,
                        **params: Any) -> pd.DataFrame:
    """Run a faithfulness-curve protocol on these images through a zero-shot classifier head.

    ``protocol="perturbation_curve"``: positive/negative perturbation (Chefer et al. 2021): the
    map's top (``direction="positive"``) or bottom (``"negative"``) 10%…90% of the pixels are set to
    black and the image is classified again by the zero-shot head over ``class_names``. The rows
    are those of ``python -m clip_xai study=perturbation_curve`` (``dataset`` is ``memory``): one
    per image, the curves as list columns and their AUCs
    (`clip_xai.schema.PERTURBATION_CURVE_COLUMNS`; see the Studies page).

    ``protocol="deletion_insertion"``: Grad-ECLIP's deletion (``mode="deletion"``: pixels in map
    order replaced by random colours) or insertion (``"insertion"``: copied onto black) curves,
    top-1/5/10 hits of the zero-shot head every ``eval_every`` steps; the rows are those of
    ``python -m clip_xai study=deletion_insertion`` (`clip_xai.schema.DELETION_INSERTION_COLUMNS`).
    It works at each image's own size: PIL images and paths are used as given (short side capped
    at ``max_side``), not their 224 crop. Its default ``map_size="auto"`` computes the maps of
    eclip, gradcam, maskclip and selfattn at that size, which needs a model loaded with
    ``keep_size=True`` (else one error names the fix; ``study_params={"map_size": "224"}`` takes
    the 224 shortcut). A tensor has no own size: its model-size pixels are used, a warning says so
    and the summary's ``deletion_insertion.images_at`` is ``model_input``.

    Args:
        model: A model from [`load_model`][clip_xai.api.load_model].
        images: As in [`explain`][clip_xai.api.explain].
        labels: One class index (into ``class_names``) per image, or None when no setting needs
            the ground truth (perturbation_curve: ``study_params={"target": "pred", "against":
            "pred"}``; deletion_insertion: ``{"target": "pred"}``, the hits then counted against
            the clean top-1).
        method: Any ``explainer=`` option with image maps.
        class_names: The zero-shot head's classes: a list of names, or ``"imagenet"`` (OpenAI's
            1,000 ImageNet names).
        protocol: Which curve study runs: one of `clip_xai.api.CURVE_PROTOCOLS` (the ``study=``
            option of that name).
        direction: perturbation_curve only: ``"positive"`` or ``"negative"``
            (``study.direction``); None takes the yaml's.
        mode: deletion_insertion only: ``"deletion"`` or ``"insertion"`` (``study.mode``); None
            takes the yaml's (deletion).
        study_params: The protocol's other settings (``study.*``, see
            ``conf/study/<protocol>.yaml``), e.g. ``{"target": "gt", "templates": "openai"}``.
        sample_ids: As in [`faithfulness`][clip_xai.api.faithfulness].
        seed: The run's seed (the command line's ``seed=``); None takes the yaml's (0).
        **params: The method's settings, as in [`explain`][clip_xai.api.explain].

    Returns:
        One row per image; ``df.attrs["summaries"]`` holds the run's ``summary.json``.

    Raises:
        ClipXaiError: As [`explain`][clip_xai.api.explain]; also an unknown protocol, ``direction``
            or ``mode`` given to the protocol that has no such setting, class names
            that are not a list of at least two names, labels of the wrong number or range, a
            setting that needs labels without them, and every bad study setting, all before any
            image is decoded.
    """
    if protocol not in CURVE_PROTOCOLS:
        raise ClipXaiError(f"unknown curve protocol {protocol!r}", f"use one of: {', '.join(CURVE_PROTOCOLS)}")
    variant = _CURVE_VARIANT[protocol]
    given = {"direction": direction, "mode": mode}
    for key, value in given.items():
        if key != variant and value is not None:
            other = next(p for p, k in _CURVE_VARIANT.items() if k == key)
            raise ClipXaiError(f"{key}={value!r} is a setting of protocol={other!r}, not of protocol={protocol!r}",
                               f"pass {variant}=... with protocol={protocol!r}, or protocol={other!r} with {key}=...")
    if isinstance(class_names, str):
        if class_names != "imagenet":
            raise ClipXaiError(f"class_names={class_names!r} is not a list of names",
                               "pass a list of class names, or 'imagenet' for OpenAI's 1,000 ImageNet names")
        from clip_xai.models.zeroshot import imagenet_classnames

        class_names = imagenet_classnames()
    if not isinstance(class_names, (list, tuple)) or len(class_names) < 2:
        raise ClipXaiError(f"class_names must be a list of at least two names, got {class_names!r}",
                           "pass e.g. class_names=['cat', 'dog'], or 'imagenet'")
    names = [str(c) for c in class_names]
    study = dict(study_params or {})
    for key in ("classes", variant):
        if key in study:
            raise ClipXaiError(f"study_params holds {key!r}",
                               f"pass it as faithfulness_curves(..., {'class_names' if key == 'classes' else key}=...)")
    study["classes"] = names
    if given[variant] is not None:
        study[variant] = given[variant]
    n = len(_image_list(images))
    if labels is not None:
        labels = [labels] if isinstance(labels, (int, np.integer)) else labels
        ok = (isinstance(labels, (list, tuple, np.ndarray, Tensor)) and len(labels) == n
              and all(_is_index(v) and 0 <= int(v) < len(names) for v in labels))
        if not ok:
            raise ClipXaiError(f"labels must be {n} class indices in [0, {len(names)}), one per image, got {labels!r}",
                               "pass one index into class_names per image, or labels=None with target/against=pred")
        labels = [int(v) for v in labels]
    texts = [names[v] for v in labels] if labels is not None else [""] * n
    return _run_study(model, images, texts, protocol, method, None, {"explainer": params, "study": study}, [None],
                      sample_ids, seed, labels=labels, classnames=names)


def _is_index(v) -> bool:
    """Whether ``v`` is a whole number (int, integral float, 0-d array or tensor), not a bool, text or None."""
    if isinstance(v, (bool, np.bool_, str, bytes)) or v is None:
        return False
    try:
        return float(v) == int(v)
    except (TypeError, ValueError, OverflowError, RuntimeError):
        return False


def _with_eps(params: dict, eps) -> dict:
    """A perturbation's settings with ``eps`` set, unless it is None (then the yaml's value stands)."""
    return dict(params) if eps is None else {**params, "eps": eps}


class _Labelled:
    """What a study's ``check_data`` reads of a dataset (class names, labels, image size), before
    any image is decoded."""

    def __init__(self, classnames, labels, n: int, image_size: int):
        self.classnames = classnames
        self.records = [Record(str(i), None, "", -1 if labels is None else labels[i]) for i in range(n)]
        self.image_size = image_size


def _run_study(model, images, texts, study_name: str, method: str, perturbation: str | None,
               settings: dict, epsilons: list, sample_ids, seed, labels: list[int] | None = None,
               classnames: list[str] | None = None) -> pd.DataFrame:
    """Build the study's parts from the composed config and run its loop once per ε in a temp dir.
    ``labels``/``classnames`` give the images class labels (curve studies)."""
    from clip_xai.studies.base import RunContext
    from clip_xai.studies.cache import CleanMapCache

    _check_model(model)
    choices = {"study": study_name, "explainer": method, **({"perturbation": perturbation} if perturbation else {})}
    cfg = _config(choices, settings, seed)
    study = build(cfg, "study")
    explainer = _build_explainer(cfg, model)
    metrics = build(cfg, "metrics")
    perturbations = [build(_config(choices, {**settings, "perturbation": _with_eps(settings["perturbation"], e)}, seed),
                           "perturbation") for e in epsilons] if study.uses_perturbation else [None]
    ids = {"dataset": "memory", "model": model.name, "explainer": explainer.name,
           "modality": explainer.modality, "seed": int(cfg.seed)}

    def context(run_dir: Path | None, dataset, perturbation, cache) -> RunContext:
        return RunContext(run_dir=run_dir, device=model.device, model=model, dataset=dataset, explainer=explainer,
                          metrics=metrics, ids=ids, seed=int(cfg.seed), batch_size=int(cfg.batch_size), num_workers=0,
                          precision=resolve_precision(model.device, str(cfg.precision)), save_examples=0,
                          perturbation=perturbation, cache=cache,
                          on_long_caption=str(cfg.dataset.get("on_long_caption", "skip")))

    if classnames is not None:  # class names and labels checked before any image is read
        study.check_data(_Labelled(classnames, labels, len(texts), int(model.image_size)))
    for pert in perturbations:
        study.check(context(None, None, pert, None))  # the study's own start-up checks, before any image is read
    inp = _inputs(model, images, texts, int(cfg.seed), sample_ids)
    dataset = PixelDataset(inp.pixels, inp.texts, inp.ids, sources=inp.sources)  # sources: own-size protocols
    if classnames is not None:
        dataset.classnames = list(classnames)
        if labels is not None:
            dataset.records = [dataclasses.replace(r, label=int(v)) for r, v in zip(dataset.records, labels)]
    study.check_data(dataset)
    frames, summaries = [], []
    with tempfile.TemporaryDirectory(prefix="clip_xai_api_") as tmp:
        share = study.uses_perturbation and len(perturbations) > 1  # a sweep: clean maps once, as on the CLI
        for i, pert in enumerate(perturbations):
            run_dir = Path(tmp) / f"run{i}"
            run_dir.mkdir()
            cache = CleanMapCache(Path(tmp) / "cache") if share else None  # per run: each summary counts its own hits
            with _seeded(int(cfg.seed), model.device):  # the study's loop sets the precision itself
                summaries.append(study.run(context(run_dir, dataset, pert, cache)))
            frames.append(pd.read_parquet(run_dir / RESULTS_FILE))
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    df.attrs["summaries"] = summaries
    return df


def show(images: Images | None, maps: Tensor | TokenScores | dict, texts: Sequence[str] | None = None,
         alpha: float = 0.5) -> Figure:
    """Draw maps over their images (token scores as a heat strip) in one matplotlib figure.

    Args:
        images: The images the maps were made from, as given to
            [`explain`][clip_xai.api.explain]. PIL images and paths are resized and centre-cropped
            to the maps' size as [`explain`][clip_xai.api.explain] did; a tensor is resized to the
            maps' size. None draws the maps alone.
        maps: Image maps (B,H,W) from [`explain`][clip_xai.api.explain], a
            [`TokenScores`][clip_xai.api.TokenScores], or a dict of either (title → maps) for one
            column per entry, e.g. one per method.
        texts: Captions to print beside each row (optional).
        alpha: Weight of the heat map over the image.

    Returns:
        A matplotlib figure with one row per image. It is not attached to pyplot; a notebook
        displays it, and ``fig.savefig(path)`` writes it.

    Raises:
        ClipXaiError: Maps of the wrong type, or maps, images and texts that differ in number.
    """
    from matplotlib import colormaps

    from clip_xai.overlay import overlay

    columns = maps if isinstance(maps, dict) else {"": maps}
    if not columns:
        raise ClipXaiError("show() got an empty dict of maps", "pass maps from explain(), or a dict of them")
    for title, m in columns.items():
        if not (isinstance(m, TokenScores) or isinstance(m, Tensor) and m.dim() == 3):
            shape = tuple(m.shape) if isinstance(m, Tensor) else ""
            raise ClipXaiError(f"maps {title!r} must be (B,H,W) image maps or TokenScores from explain(), "
                               f"got {type(m).__name__}{shape}", "pass what explain() returned")
    lengths = sorted({len(m) for m in columns.values()})
    if len(lengths) != 1:
        raise ClipXaiError(f"the maps hold different numbers of samples: {lengths}", "pass maps of the same images")
    n = lengths[0]
    items = None if images is None else _image_list(images)
    if items is not None and len(items) != n:
        raise ClipXaiError(f"{len(items)} image(s) but {n} map(s)", "pass the images the maps were made from")
    texts = None if texts is None else _text_list(texts, n)

    pictures: dict[tuple[int, int], np.ndarray] = {}

    def picture(size: tuple[int, int]) -> np.ndarray:
        """The images as (B,H,W,3) uint8 at ``size`` (None: as given, tensors only)."""
        if size not in pictures:
            if isinstance(items, Tensor):
                px = items.detach().float().cpu()
                if tuple(px.shape[-2:]) != size:
                    px = F.interpolate(px, size=size, mode="bicubic", align_corners=False, antialias=True)
            elif size[0] != size[1]:
                raise ClipXaiError(f"maps of size {size} do not fit images preprocessed to a square",
                                   "pass the maps explain() returned for these images")
            else:
                px = _decode(items, size[0])
            pictures[size] = (px.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        return pictures[size]

    is_text = [isinstance(m, TokenScores) for m in columns.values()]
    lead = items is not None and all(is_text)  # token strips only: the image in front of them
    ratios = [1.0] * lead + [2.0 if t else 1.0 for t in is_text]
    fig = _NotebookFigure(figsize=(2.2 * sum(ratios), 2.3 * n), dpi=80)
    axes = fig.subplots(n, len(ratios), squeeze=False, gridspec_kw={"width_ratios": ratios})
    jet = colormaps["jet"]
    for row in range(n):
        if lead:  # the image as given (a map's size does not apply)
            img = items[row] if isinstance(items, Tensor) else TF.pil_to_tensor(_read(items[row])).float() / 255
            axes[row, 0].imshow(img.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy())
            axes[row, 0].set_xticks([])
        for col, (title, m) in enumerate(columns.items(), start=lead):
            ax = axes[row, col]
            if isinstance(m, TokenScores):
                s = m.scores[row].float().numpy()
                span = s.max() - s.min() if s.size else 0.0
                heat = (s - s.min()) / span if m.raw and span > 0 else s  # raw scores: scaled for display only
                ax.imshow(heat[None], cmap=jet, vmin=0, vmax=1, aspect="auto")
                ax.set_box_aspect(0.2)  # a strip of token cells
                ax.set_xticks(range(len(m.tokens[row])), m.tokens[row], rotation=45, ha="right", fontsize=8)
            else:
                heat = m[row].detach().float().cpu().numpy()
                ax.imshow(heat, cmap=jet, vmin=0, vmax=1) if items is None else ax.imshow(
                    overlay(picture(tuple(heat.shape))[row], heat, alpha))
                ax.set_xticks([])
            if title and row == 0:
                ax.set_title(title, fontsize=9)
        axes[row, 0].set_ylabel(texts[row] if texts is not None else "", fontsize=8)
        for ax in axes[row]:
            ax.set_yticks([])
    fig.tight_layout()
    return fig
