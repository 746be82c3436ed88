"""Explainer base: a batch of (image, caption) pairs in, one raw map per pair out.

Image maps come back on the patch grid (B, h, w) or at image size (B, H, W) for methods that
work in pixel space (RISE, Surgery, Saliency, ...); text maps come back as per-token scores
(B, L). Post-processing (min-max, upsampling, restricting text scores to caption tokens) is
shared in :mod:`clip_xai.explainers.postprocess`, never done per method.

A new method is one subclass + one yaml under ``conf/explainer/``: set ``modalities`` and
``requires`` and implement ``explain_image`` and/or ``explain_text``, or ``explain`` when one body
serves both.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from clip_xai.errors import ClipXaiError
from clip_xai.models.base import CAPABILITIES, BlockRecord, ClipAdapter, Tower, input_size
from clip_xai.types import TextTokens

MODALITIES = ("image", "text")


class SampleRng:
    """One torch.Generator per sample, so a sample's noise does not depend on its batch mates.

    Seeds come from the study (global seed ⊕ sample id), so clean and perturbed maps of one
    sample see identical noise and a resumed or re-batched run reproduces its maps.
    """

    def __init__(self, seeds: Tensor | list[int], device: torch.device):
        self.device = torch.device(device)
        self.gens = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def normal(self, *shape: int, dtype=torch.float32) -> Tensor:
        """(B, *shape) standard normal draws, row b from sample b's generator."""
        return torch.stack([torch.randn(shape, generator=g, device=self.device, dtype=dtype) for g in self.gens])

    def normal_at(self, real: Tensor, copies: int, width: int, dtype=torch.float32) -> Tensor:
        """(B, copies, N, width) standard normal draws at the positions where ``real`` (B, N) is
        True, zero elsewhere. Sample b draws (copies, real[b].sum(), width) values, so its noise
        depends on how many real tokens it has, not on how much padding follows them (the
        references explain unpadded ids). With ``real`` all True this equals :meth:`normal`."""
        b, n = real.shape
        out = torch.zeros(b, copies, n, width, device=self.device, dtype=dtype)
        for i, g in enumerate(self.gens):
            pos = real[i].to(self.device).nonzero().squeeze(-1)
            out[i][:, pos] = torch.randn((copies, pos.numel(), width), generator=g, device=self.device, dtype=dtype)
        return out


class Explainer:
    """Base class. ``modality`` picks which map :meth:`__call__` returns."""

    modalities: frozenset[str] = frozenset({"image"})
    #: Most samples explained at once on a CPU (None: the whole batch). Iterative methods set it:
    #: their working set (noise copies x tokens x width per sample) leaves the CPU's cache beyond a
    #: few samples, and a batch of 16 then runs slower per image than a batch of 1. Maps do not
    #: depend on batch composition, so splitting changes speed only.
    cpu_micro_batch: int | None = None
    #: What the explained tower must provide (names from ``models.base.CAPABILITIES``), by
    #: condition: ``"*"`` always, ``"image"``/``"text"`` for that modality, ``"attr=value"`` when
    #: the setting ``attr`` is ``value``; ``&`` joins conditions. Checked at start-up, so a model
    #: without them gets one clear error instead of a shape error mid-run.
    requires: dict[str, frozenset[str]] = {}
    #: True when ``explain`` builds the image map as a differentiable function of the pixels under
    #: :func:`keep_graph` (no ``no_grad``/``detach`` on the path, gradients taken with
    #: ``create_graph``), so an attack on the map itself (``perturbation=map_attack``) can
    #: backpropagate through it. Iterative or sampling methods (RISE, M2IB, ABM, MFABA) leave it False.
    differentiable: bool = False
    #: True when the maps are sums over a larger per-pair array that studies compare too: the
    #: caption-token × image-patch matrix (``interactions``). Such a class implements
    #: ``explain_matrix`` → (B, L, h, w), zero rows at padding, and ``map_from_matrix`` (that
    #: array → this modality's raw map); :meth:`matrices` is its public entry.
    has_matrix: bool = False

    def __init__(self, name: str, modality: str = "image"):
        self.name = name
        if modality not in MODALITIES:
            raise ClipXaiError(f"unknown modality {modality!r} for explainer {name}",
                               "use explainer.modality=image or text")
        if modality not in self.modalities:
            raise ClipXaiError(
                f"explainer {name} has no {modality} maps (it supports: {', '.join(sorted(self.modalities))})",
                f"use explainer.modality={sorted(self.modalities)[0]} or an explainer with {modality} maps",
            )
        self.modality = modality

    def check_model(self, model: ClipAdapter) -> None:
        """Raise ClipXaiError if this explainer cannot run on ``model`` (override when needed)."""

    def requirements(self) -> frozenset[str]:
        """The capabilities :attr:`requires` asks of the explained tower with these settings."""
        def holds(cond: str) -> bool:
            if cond == "*" or cond in MODALITIES:
                return cond in ("*", self.modality)
            attr, _, value = cond.partition("=")
            return str(getattr(self, attr, None)) == value

        need = set()
        for conds, caps in self.requires.items():
            if all(holds(c.strip()) for c in conds.split("&")):
                need |= set(caps)
        unknown = need - set(CAPABILITIES)
        if unknown:
            raise ClipXaiError(f"explainer {self.name} requires unknown capabilities {sorted(unknown)}",
                               f"use names from clip_xai.models.base.CAPABILITIES: {sorted(CAPABILITIES)}")
        return frozenset(need)

    def check_requirements(self, model: ClipAdapter) -> None:
        """One ClipXaiError naming the method, the model and what the explained tower lacks.

        Called on every path that can start work (the entrypoint before anything is announced,
        ``Study.check``, every ``__call__``); a model that passed once for this modality is
        remembered (weakly), so the later calls cost a dictionary lookup, not a recheck."""
        checked = self.__dict__.setdefault("_requirements_checked", weakref.WeakKeyDictionary())
        if self.modality in checked.get(model, ()):
            return
        tower = tower_for(model, self.modality)
        lacking = sorted(self.requirements() - tower.provides)
        if lacking:
            what = "; ".join(f"{c} ({CAPABILITIES[c]})" for c in lacking)
            why = "; ".join(dict.fromkeys(tower.missing.get(c, "it does not provide it") for c in lacking))
            raise ClipXaiError(
                f"explainer {self.name} ({self.modality} maps) cannot run on model {model.name}: its "
                f"{self.modality} tower lacks {what}; because {why}",
                "use a class-token ViT CLIP for this method (e.g. model=vit_b16, model=open_clip "
                "model.arch=ViT-L-14), or a method that needs only the embeddings (explainer=rise)",
            )
        checked.setdefault(model, set()).add(self.modality)

    def __call__(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor | None = None) -> Tensor:
        return self._batched(self.explain, model, pixels, tokens, seeds)

    def matrices(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor | None = None) -> Tensor:
        """The (B, L, h, w) token × patch arrays of an explainer with :attr:`has_matrix`."""
        if not self.has_matrix:
            raise ClipXaiError(f"explainer {self.name} has no token × patch matrix", "use explainer=interactions")
        return self._batched(self.explain_matrix, model, pixels, tokens, seeds)

    def _batched(self, fn, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor | None) -> Tensor:
        """``fn`` on the batch, in ``cpu_micro_batch`` pieces on a CPU, detached."""
        self.check_requirements(model)
        if seeds is None:
            seeds = torch.zeros(pixels.shape[0], dtype=torch.long)
        n = pixels.shape[0]
        step = self.cpu_micro_batch if pixels.device.type == "cpu" and self.cpu_micro_batch else n
        with input_size(pixels):  # patch maps follow the input's grid (keep-size mode)
            if n <= step:
                return fn(model, pixels, tokens, seeds).detach()
            return torch.cat([fn(model, pixels[i : i + step], tokens.index(slice(i, i + step)),
                                 seeds[i : i + step]).detach() for i in range(0, n, step)])

    def explain(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        """The map of ``self.modality``. Methods whose code is the same for both modalities (it reads
        ``self.modality``) override this; the others implement ``explain_image``/``explain_text``."""
        fn = self.explain_image if self.modality == "image" else self.explain_text
        return fn(model, pixels, tokens, seeds)

    def explain_image(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        raise NotImplementedError

    def explain_text(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        raise NotImplementedError

    def config_key(self) -> str:
        """Stable hash of the explainer's scalar settings (tests check yaml defaults = class defaults)."""
        state = {k: v for k, v in vars(self).items() if isinstance(v, (int, float, str, bool, type(None), list, tuple))}
        state["class"] = type(self).__qualname__
        return hashlib.sha1(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- differentiable maps (double backpropagation) --------------------------------------------

_KEEP_GRAPH = contextvars.ContextVar("clip_xai_keep_graph", default=False)


@contextlib.contextmanager
def keep_graph():
    """Inside, explainers with ``differentiable = True`` return maps that keep their graph to the
    pixels they were given (which must require grad): inner gradients are taken with
    ``create_graph=True`` and nothing on the path is detached. Attention runs on the plain math
    kernel, the only one with a double backward on every device."""
    token = _KEEP_GRAPH.set(True)
    try:
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        _KEEP_GRAPH.reset(token)


def graph_kept() -> bool:
    """True inside :func:`keep_graph`."""
    return _KEEP_GRAPH.get()


def maybe_no_grad():
    """``torch.no_grad()``, except inside :func:`keep_graph` (then a no-op)."""
    return contextlib.nullcontext() if graph_kept() else torch.no_grad()


def maybe_detach(t: Tensor) -> Tensor:
    """``t.detach()``, except inside :func:`keep_graph`."""
    return t if graph_kept() else t.detach()


def grad_input(x: Tensor) -> Tensor:
    """The leaf a method differentiates (pixels or a hidden state): a fresh detached copy, or,
    inside :func:`keep_graph`, ``x`` itself when it already carries a graph to the pixels."""
    if graph_kept() and x.requires_grad:
        return x
    return x.detach().requires_grad_(True)


# --- forward helpers shared by the methods -------------------------------------------------


def text_target(model: ClipAdapter, tokens: TextTokens) -> Tensor:
    """Detached unit text embeddings: the fixed target of image-side methods."""
    with torch.no_grad():
        return model.encode_text(tokens)


def image_target(model: ClipAdapter, pixels: Tensor) -> Tensor:
    """Detached unit image embeddings: the fixed target of text-side methods."""
    with torch.no_grad():
        return model.encode_image(pixels)


def tower_for(model: ClipAdapter, modality: str) -> Tower:
    """The tower whose maps ``modality`` asks for."""
    return model.vision if modality == "image" else model.text


def other_target(model: ClipAdapter, modality: str, pixels: Tensor, tokens: TextTokens) -> Tensor:
    """Detached unit embedding of the other modality: the fixed target when explaining ``modality``."""
    return text_target(model, tokens) if modality == "image" else image_target(model, pixels)


def cosine(emb: Tensor, unit_target: Tensor) -> Tensor:
    """Row-wise cosine of raw embeddings against unit targets, (B,)."""
    return (F.normalize(emb, dim=-1) * unit_target).sum(-1)


def vision_similarity(model: ClipAdapter, pixels: Tensor, target: Tensor, **run_kwargs) -> tuple[Tensor, dict[int, BlockRecord]]:
    """Cosine(image, target) with the graph kept so records can be differentiated."""
    with torch.enable_grad():
        px = grad_input(pixels)
        emb, records = model.vision(px, **run_kwargs)
        return cosine(emb, target), records


def pixel_gradient(model: ClipAdapter, pixels: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(∂cos(f_I(x), target)/∂x, cos) for [0,1] pixels x, per sample."""
    with torch.enable_grad():
        px = grad_input(pixels)
        s = cosine(model.vision(px)[0], target)
        (g,) = grad(s, [px])
    return g, s.detach()


def grad(output: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    """Per-sample gradients of a (B,) output (samples are independent, so sum is exact); inside
    :func:`keep_graph` they keep their own graph (``create_graph``) for a second derivative."""
    kept = graph_kept()
    return list(torch.autograd.grad(output.sum(), inputs, create_graph=kept, retain_graph=kept))


def pooled_rows(t: Tensor, index: Tensor) -> Tensor:
    """Pick row ``index[b]`` of ``t[b]`` along dim −2: (B, ..., N, M) → (B, ..., M)."""
    idx = index.view(-1, *([1] * (t.dim() - 1))).expand(*t.shape[:-2], 1, t.shape[-1])
    return t.gather(-2, idx).squeeze(-2)
