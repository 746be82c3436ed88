"""A zero-shot classifier head for any adapter: class names × prompt templates → class embeddings.

For each class, every template is filled with the class name, the prompts' unit text embeddings are
averaged and the mean is renormalised, as open_clip's ``build_zero_shot_classifier`` and
Grad-ECLIP's ``clip_utils.py`` do (Radford et al. 2021, the OpenAI ImageNet prompt ensemble). Logits
are ``100 · normalised image embedding @ weightsᵀ`` (the factor the references use; the checkpoint's
own ``logit_scale`` is an option). OpenAI's 1,000 ImageNet class names and 80 templates are imported
from ``open_clip.zero_shot_metadata``, never copied; open_clip is imported only when they are asked for.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from clip_xai.errors import ClipXaiError

#: The prompt the project's class-prompt sets have always used (perturbations' ``prompt``).
SIMPLE_TEMPLATE = "a photo of a {}"
#: Prompts per text-encoder forward when the class weights are built.
TEXT_BATCH = 256
#: The logit factor the references use (open_clip's zero-shot eval, Grad-ECLIP, LeGrad).
REFERENCE_LOGIT_SCALE = 100.0


def _openai_templates() -> tuple[str, ...]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(as_format_string(t) for t in OPENAI_IMAGENET_TEMPLATES)


class _TemplateSets(Mapping):
    """name → templates (format strings with ``{}``); ``openai`` is read from open_clip on first use."""

    _loaders: dict[str, Callable[[], tuple[str, ...]]] = {
        "openai": _openai_templates,
        "simple": lambda: (SIMPLE_TEMPLATE,),
    }

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return self._loaders[name]()

    def __iter__(self):
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


#: Named template sets: ``"openai"`` = OpenAI's 80 ImageNet templates (as open_clip ships them),
#: ``"simple"`` = the single ``"a photo of a {}"`` the project's class prompts use.
TEMPLATE_SETS: Mapping[str, tuple[str, ...]] = _TemplateSets()


def imagenet_classnames() -> list[str]:
    """OpenAI's 1,000 ImageNet class names (``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def as_format_string(template) -> str:
    """A template as a format string with one ``{}``: open_clip's callables are applied to ``"{}"``."""
    return str(template("{}") if callable(template) else template)


def resolve_templates(templates) -> tuple[str, ...]:
    """A template-set name or a list of format strings/callables → a tuple of format strings, checked."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ClipXaiError(f"template set {templates!r} is not known",
                               f"use one of {sorted(TEMPLATE_SETS)} or a list of format strings with {{}}, "
                               "e.g. ['a photo of a {}.']")
        return TEMPLATE_SETS[templates]
    out = tuple(as_format_string(t) for t in (templates or ()))
    if not out:
        raise ClipXaiError("the template list is empty", "give at least one template, e.g. ['a photo of a {}.']")
    bad = [t for t in out if "{}" not in t]
    if bad:
        raise ClipXaiError(f"template(s) {bad} have no {{}} for the class name",
                           "write each template with {} where the class name goes, e.g. 'a photo of a {}.'")
    return out


def label_map(dataset_names: Sequence[str] | None, class_names: Sequence[str], labels: Sequence[int],
              needs_labels: bool = True) -> Tensor | None:
    """Dataset labels (indices into ``dataset_names``, the dataset's ``classnames``) onto a head over
    ``class_names`` (``study.classes``), by name: ``None`` when the labels index ``class_names`` as they
    are (the same list, or a dataset without names), else a (len(dataset_names),) long tensor, -1 for a
    dataset class the head lacks. Shared by the curve studies (perturbation_curve, deletion_insertion).

    With ``needs_labels``, a label (>= 0) beyond its list, or one whose class is not among
    ``class_names``, is a :class:`~clip_xai.errors.ClipXaiError` (before any work).
    """
    own, names = [str(n) for n in dataset_names or []], [str(n) for n in class_names]
    used = sorted({int(lb) for lb in labels if int(lb) >= 0})
    ref = own or names
    if needs_labels and used and used[-1] >= len(ref):
        raise ClipXaiError(f"a label ({used[-1]}) is beyond the {len(ref)} classes of "
                           + ("the dataset" if own else "study.classes"),
                           "give one class name per label")
    if not own or own == names:
        return None
    missing = list(dict.fromkeys(own[lb] for lb in used if own[lb] not in names))
    if needs_labels and missing:
        raise ClipXaiError(f"the dataset's classes {missing[:5]} ({len(missing)} in all) are not in study.classes",
                           "use study.classes=auto, or a class list holding the class of every labelled sample")
    index = {n: i for i, n in enumerate(names)}
    return torch.tensor([index.get(n, -1) for n in own], dtype=torch.long)


def check_logit_scale(value) -> None:
    """Refuse a zero-shot ``logit_scale`` that is neither a positive finite number nor ``"model"``
    (one :class:`ClipXaiError`; shared by the head and the studies that check settings early)."""
    if value == "model":
        return
    try:
        ok = not isinstance(value, (str, bool)) and math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ClipXaiError(f"logit_scale={value!r} is neither a positive number nor 'model'",
                           "use logit_scale=100 (the references) or 'model' (the checkpoint's own)")


def _weights_version(model) -> int:
    """Sum of the parameters' in-place version counters: changes whenever weights are re-drawn or
    restored in place (model randomisation), so a cached head is never reused across that."""
    return sum(p._version for p in model.parameters())


class ZeroShotHead:
    """Zero-shot classifier over ``class_names`` with ``templates`` (a name of :data:`TEMPLATE_SETS`
    or a list of format strings / open_clip-style callables).

    ``logit_scale``: the factor on the cosine in :meth:`logits`; 100 (the references) by default,
    ``"model"`` takes the checkpoint's own ``exp(logit_scale)``. Class weights are cached per model
    object (weakly), device, dtype, weights version, class list and template list.
    """

    def __init__(self, class_names: Sequence[str], templates="openai", logit_scale: float | str = REFERENCE_LOGIT_SCALE):
        if isinstance(class_names, str) or class_names is None:
            raise ClipXaiError(f"class names {class_names!r} are not a list of names",
                               "give a list of at least two class names, e.g. ['cat', 'dog']")
        names = tuple(str(c) for c in class_names)
        if len(names) < 2:
            raise ClipXaiError(f"a zero-shot head needs at least 2 classes, got {len(names)}",
                               "give a list of at least two class names, e.g. ['cat', 'dog']")
        check_logit_scale(logit_scale)
        self.class_names = names
        self.templates = resolve_templates(templates)
        self.logit_scale = logit_scale
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _key(self, model) -> tuple:
        p = next(model.parameters())
        return (str(p.device), str(p.dtype), _weights_version(model), self.class_names, self.templates)

    def weights(self, model) -> Tensor:
        """(C, E) float32 unit class embeddings on the model's device (cached, see the class docstring)."""
        key = self._key(model)
        per_model = self._cache.setdefault(model, {})
        if key not in per_model:
            per_model.clear()  # one live entry per model: an old device/dtype/weights version is stale
            per_model[key] = self._build(model)
        return per_model[key]

    def _build(self, model) -> Tensor:
        prompts = [t.format(c) for c in self.class_names for t in self.templates]
        with torch.no_grad():
            emb = torch.cat([model.encode_text(model.tokenize(prompts[i:i + TEXT_BATCH])).float()
                             for i in range(0, len(prompts), TEXT_BATCH)])
        emb = F.normalize(emb, dim=-1).view(self.num_classes, len(self.templates), -1).mean(1)
        return F.normalize(emb, dim=-1)

    def scale(self, model) -> float:
        return float(model.logit_scale) if self.logit_scale == "model" else float(self.logit_scale)

    def logits(self, model, image_embeddings: Tensor) -> Tensor:
        """(B, C) = scale · normalise(image_embeddings) @ weightsᵀ, in float32."""
        w = self.weights(model)
        img = F.normalize(image_embeddings.float(), dim=-1).to(w.device)
        return self.scale(model) * img @ w.T

    def image_logits(self, model, pixels: Tensor) -> Tensor:
        """(B, C) logits of [0,1] pixels (no gradients)."""
        with torch.no_grad():
            return self.logits(model, model.encode_image(pixels))

    def predict(self, model, pixels: Tensor) -> Tensor:
        """(B,) top-1 class indices of [0,1] pixels."""
        return self.image_logits(model, pixels).argmax(1)
