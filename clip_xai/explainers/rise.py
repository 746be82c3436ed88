"""RISE: Randomized Input Sampling for Explanation (Petsiuk et al., BMVC 2018; METHODS.md §2.7).

The GE/PRED variant (Cyang-Zhao/Grad-Eclip, generate_emap.py ``generate_masks``/``rise``) for
images and a NIB-style variant (LMBTough/NIB, salicncy/rise.py ``RISET``) for captions.

Image (``modality: image``). ``n_masks`` smooth random masks: a Bernoulli(``p1``) grid of
``s``×``s`` cells, bilinearly upsampled to ``(s+1)·ceil(H/s)`` (and ``W``), then cropped at a
random offset in ``[0, cell)``. Each mask M_k gives a masked image whose score is
``s_k = cos(f_I(masked_k), f_T)``; the map is ``Σ_k s_k·M_k / (N·p1)`` at image size (B,H,W).

Choices, all documented deviations or reference reproductions:

* **Seeded, shared masks (the fix for the reference).** The reference redraws masks on every call
  from the unseeded global NumPy RNG, so a clean and a perturbed map of one image use different
  masks and the sensitivity metrics measure RNG noise (PRED reports ~zero stability for RISE).
  Here the masks are drawn ONCE per (``mask_seed``, image size, device) from a
  ``torch.Generator`` on the model's device and cached on the explainer; every sample, clean or
  perturbed, uses the same masks. ``mask_seed: null`` reproduces the reference (fresh masks from
  the global torch RNG on every call, nothing cached).
* **Upsampling.** The reference uses ``skimage.transform.resize(order=1, mode='reflect',
  anti_aliasing=False)``. We build the equivalent separable linear-interpolation matrix in torch:
  half-pixel centres (``u = (j+0.5)·s/up − 0.5``, i.e. ``align_corners=False``) and skimage's
  ``reflect`` boundary (mirror without repeating the edge cell: index −1 → 1, s → s−2). Plain
  ``F.interpolate(align_corners=False)`` would clamp at the border instead. The cache stores only
  the binary grids and crop offsets; a chunk of masks is materialised on demand as
  ``R_k · grid_k · C_kᵀ`` (R, C = cropped rows of the interpolation matrices), so 2000 masks cost
  no 400 MB of memory.
* **Masked pixels.** The reference multiplies the *normalised* image by the mask, so masked
  pixels become 0 in normalised space, i.e. the dataset mean colour. Our pixels are [0,1] and the
  tower normalises inside, so we blend towards the mean colour: ``x_k = μ + M_k·(x − μ)`` with
  ``μ = model.vision.mean`` (0.5 grey if the tower has no ``mean`` buffer). This is exactly the
  reference's operation.
* **Batching.** Samples and masks are batched together: each forward sees about ``chunk`` masked
  images or captions (``chunk // B`` masks for each of the B samples), so memory does not grow
  with B. ``chunk: auto`` is chosen from the model and the device by :func:`auto_chunk`: on CUDA
  from the free device memory, on a CPU from the tower's size and the last-level cache (enough
  token rows per pass to amortise per-op costs, more while the activations stay in the cache;
  docs/performance.md).
* **On the device.** Masks are drawn, upsampled and blended on the model's device; on CUDA the
  kernels are queued asynchronously, so mask creation overlaps the forwards already queued.
* **Compilation** (opt-in: ``false`` by default until measured on a GPU). ``compile: auto`` (on
  CUDA) / ``true`` compiles the no-grad image forward
  with ``torch.compile`` (static shapes: every pass is padded to exactly ``chunk`` rows, so one
  graph serves every batch). ``false`` is the off switch; ``auto`` is off on a CPU.
* **Progress.** Masks done are reported through :mod:`clip_xai.progress` (job ETA included).

Text (``modality: text``, NIB-style). ``n_masks_text`` 1-D Bernoulli(``p1_text``) grids of
``s_text`` cells, linearly upsampled (same rule) to ``(s_text+1)·ceil(n/s_text)`` and cropped at a
random offset in ``[0, cell)`` to the ``n`` caption (content) tokens of each sample. A mask scales
the tokens' input before block 0 as ``text_scaling`` says; the score is ``cos(f_T(masked), f_I)``;
the map is ``Σ_k s_k·M_k/(N·p1_text)`` per token (B,L), zero outside the caption.

* ``text_scaling: embedded`` (``rise``): the mask scales the caption tokens' input vectors (the
  output of ``Tower.embed``: token plus position vectors, on AltCLIP after the embedding
  LayerNorm); start/end/padding tokens are never scaled.
* ``text_scaling: token_table`` (``rise_nib``, NIB's ``RISET.forward``): the mask spans the start
  token, the caption and the end token, and scales the rows of the token-embedding *table* that
  those positions read, before the position (and AltCLIP's token-type) embeddings are added and
  before any embedding norm. A token id at several positions has one row, so all of them take the
  mask of the last one (NIB writes the rows in place in position order). Nothing of the model is
  modified here: the scaled rows are subtracted from ``Tower.input_embedding``.
  The map is still reported on the caption tokens only (NIB's array also holds the start and end
  tokens, which changes its min-max range, not the caption tokens' order).

The masks are drawn once
per (``mask_seed``, device) and the crop for a caption of ``n`` tokens is a deterministic function
of ``n``, so the same caption always sees the same masks. NIB uses N=200, s=8, p1=0.1; the
defaults here use p1=0.5 like the image variant.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from clip_xai import progress
from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import Explainer, image_target, text_target
from clip_xai.explainers.bottleneck import repeat_bias
from clip_xai.models.base import ClipAdapter
from clip_xai.types import TextTokens

log = logging.getLogger(__name__)

# --- chunk: auto ----------------------------------------------------------------------------
CUDA_MEMORY_SHARE = 0.5  # of the free device memory that one pass's activations may take
CUDA_MAX_CHUNK = 1000  # H100, ViT-B/16 bf16: 1,000 -> 3.48 img/s, 2,000 -> 3.58 at twice the memory (docs/performance.md)
CPU_CACHE_SHARE = 0.5  # of the last-level cache that one block's activations for a pass may take
CPU_MIN_ROWS = 3072  # token rows per pass: fewer leave per-op and weight-streaming costs unamortised (docs/performance.md)
CPU_MAX_CHUNK = 64
CACHE_FALLBACK = 8 * 2**20  # last-level cache size assumed when the OS does not say


def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache (Linux sysfs), or ``CACHE_FALLBACK`` when unknown."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or CACHE_FALLBACK


def activation_bytes(tokens: int, width: int, heads: int, elt: int) -> int:
    """Live bytes of one input inside one transformer block: residual, norm, q/k/v, context and the
    4x-wide MLP in and out (16 x tokens x width), plus the attention scores (heads x tokens²) where
    attention is not fused."""
    return (16 * tokens * width + heads * tokens * tokens) * elt


def auto_chunk(device: torch.device, tokens: int, width: int, heads: int, input_bytes: int, elt: int,
               free_bytes: int | None = None, cache_bytes: int | None = None) -> int:
    """Inputs per forward pass for ``chunk: auto``.

    CUDA: as many as fit in ``CUDA_MEMORY_SHARE`` of the free memory (each costs its block
    activations plus ``input_bytes`` for the pixels, mask and masked copy), at most
    ``CUDA_MAX_CHUNK``. CPU: at least ``CPU_MIN_ROWS`` token rows (16 images of 197 tokens), more
    while one block's activations stay within ``CPU_CACHE_SHARE`` of the last-level cache, at most
    ``CPU_MAX_CHUNK``. Measured on the 2-core build CPU: tiny model 16 beat 100 (activations out of
    the cache); ViT-B/16, whose activations never fit, 16 beat 2.
    ``free_bytes``/``cache_bytes`` default to what the device reports.
    """
    per_input = activation_bytes(tokens, width, heads, elt)
    if torch.device(device).type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
        return int(max(1, min(CUDA_MAX_CHUNK, CUDA_MEMORY_SHARE * free // (per_input + input_bytes))))
    cache = last_level_cache_bytes() if cache_bytes is None else cache_bytes
    fit = int(CPU_CACHE_SHARE * cache // per_input)
    return int(max(1, min(CPU_MAX_CHUNK, max(fit, math.ceil(CPU_MIN_ROWS / tokens)))))


def interp_matrix(s: int, up: int, device=None, dtype=torch.float32) -> Tensor:
    """(up, s) linear-interpolation matrix: ``out = W @ grid`` resizes ``s`` cells to ``up`` samples.

    Matches ``skimage.transform.resize(order=1, mode='reflect', anti_aliasing=False)`` along one
    axis: half-pixel centres and mirror boundary without edge repetition.
    """
    u = (torch.arange(up, dtype=torch.float64) + 0.5) * (s / up) - 0.5
    i0 = torch.floor(u)
    frac = u - i0
    i0 = i0.long()

    def reflect(i: Tensor) -> Tensor:
        if s == 1:
            return torch.zeros_like(i)
        period = 2 * (s - 1)
        i = i.abs() % period
        return torch.where(i > s - 1, period - i, i)

    w = torch.zeros(up, s, dtype=torch.float64)
    rows = torch.arange(up)
    w.index_put_((rows, reflect(i0)), 1 - frac, accumulate=True)
    w.index_put_((rows, reflect(i0 + 1)), frac, accumulate=True)
    return w.to(device=device, dtype=dtype)


class RiseMasks:
    """N image masks of size (H, W), stored as binary grids + crop offsets (see module docstring)."""

    def __init__(self, n: int, s: int, p1: float, size: tuple[int, int], device: torch.device,
                 generator: torch.Generator | None):
        self.n, self.s, self.p1 = n, s, p1
        self.size = (int(size[0]), int(size[1]))
        h, w = self.size
        cell_h, cell_w = math.ceil(h / s), math.ceil(w / s)
        kw = dict(generator=generator, device=device)
        self.grid = (torch.rand(n, s, s, **kw) < p1).float()
        off_h = torch.randint(0, cell_h, (n,), **kw)
        off_w = torch.randint(0, cell_w, (n,), **kw)
        self.offsets = torch.stack([off_h, off_w], dim=1)  # (N, 2): row, column crop offsets
        self.rows = interp_matrix(s, (s + 1) * cell_h, device)
        self.cols = interp_matrix(s, (s + 1) * cell_w, device)

    def chunk(self, start: int, stop: int) -> Tensor:
        """Masks ``start..stop-1`` as a (k, H, W) float tensor in [0, 1]."""
        h, w = self.size
        dev = self.grid.device
        off = self.offsets[start:stop]
        r = self.rows[off[:, :1] + torch.arange(h, device=dev)]  # (k, H, s)
        c = self.cols[off[:, 1:] + torch.arange(w, device=dev)]  # (k, W, s)
        return r @ self.grid[start:stop] @ c.transpose(1, 2)

    def full(self) -> Tensor:
        return self.chunk(0, self.n)


class RiseTextMasks:
    """N 1-D token masks; the crop for a caption of ``n`` tokens is derived deterministically."""

    def __init__(self, n: int, s: int, p1: float, device: torch.device, generator: torch.Generator | None):
        self.n, self.s, self.p1 = n, s, p1
        kw = dict(generator=generator, device=device)
        self.grid = (torch.rand(n, s, **kw) < p1).float()
        self.shift = torch.rand(n, **kw)  # crop offset = floor(shift·cell), in [0, cell)
        self._by_length: dict[int, Tensor] = {}

    def for_length(self, length: int) -> Tensor:
        """(N, length) masks for a caption of ``length`` content tokens."""
        if length not in self._by_length:
            dev = self.grid.device
            cell = max(1, math.ceil(length / self.s))
            mat = interp_matrix(self.s, (self.s + 1) * cell, dev)
            off = (self.shift * cell).floor().long().clamp_max(cell - 1)
            rows = mat[off[:, None] + torch.arange(length, device=dev)]  # (N, length, s)
            self._by_length[length] = (rows @ self.grid[:, :, None]).squeeze(-1)
        return self._by_length[length]


#: How a text mask reaches the model (module docstring, "Text").
TEXT_SCALINGS = ("embedded", "token_table")


class RISE(Explainer):
    """RISE saliency (see module docstring for the reference behaviour and the deviations)."""

    modalities = frozenset({"image", "text"})
    requires = {"text": frozenset({"blocks"})}

    def __init__(self, name: str = "rise", modality: str = "image", n_masks: int = 2000, s: int = 8,
                 p1: float = 0.5, chunk: int | str = "auto", mask_seed: int | None = 0, n_masks_text: int = 200,
                 s_text: int = 8, p1_text: float = 0.5, compile: bool | str = False,
                 compile_backend: str = "inductor", text_scaling: str = "embedded"):
        super().__init__(name, modality)
        if text_scaling not in TEXT_SCALINGS:
            raise ClipXaiError(f"rise text_scaling={text_scaling!r} is not known",
                               f"set explainer.text_scaling to one of {', '.join(TEXT_SCALINGS)}")
        self.text_scaling = text_scaling
        if chunk != "auto" and (not str(chunk).isdigit() or int(chunk) < 1):
            raise ClipXaiError(f"rise chunk={chunk} must be a positive integer or auto", "set explainer.chunk=auto")
        if compile not in ("auto", True, False):
            raise ClipXaiError(f"rise compile={compile!r} must be auto, true or false", "set explainer.compile=auto")
        for key, val in (("n_masks", n_masks), ("s", s), ("n_masks_text", n_masks_text), ("s_text", s_text)):
            if int(val) < 1:
                raise ClipXaiError(f"rise {key}={val} must be a positive integer", f"set explainer.{key}>=1")
        for key, val in (("p1", p1), ("p1_text", p1_text)):
            if not 0.0 < float(val) <= 1.0:
                raise ClipXaiError(f"rise {key}={val} must be in (0, 1]", f"set explainer.{key} to e.g. 0.5")
        self.n_masks, self.s, self.p1 = int(n_masks), int(s), float(p1)
        self.chunk = chunk if chunk == "auto" else int(chunk)
        self.mask_seed = None if mask_seed is None else int(mask_seed)
        self.n_masks_text, self.s_text, self.p1_text = int(n_masks_text), int(s_text), float(p1_text)
        self._image_masks: dict[tuple, RiseMasks] = {}
        self._text_masks: dict[tuple, RiseTextMasks] = {}
        self.compile, self.compile_backend = compile, str(compile_backend)
        self._compiled: dict[tuple, tuple] = {}
        self._auto_chunks: dict[tuple, int] = {}

    def chunk_size(self, model: ClipAdapter, device: torch.device, size: tuple[int, int] | None = None) -> int:
        """Inputs per forward pass: ``chunk``, or :func:`auto_chunk` for the explained tower at image
        size ``size`` = (H, W) (None: the model's own size; keep-size inputs are larger or smaller).

        The auto value is decided once per (model, device, precision, size) and kept, so every map of
        a job sums its masks in the same passes (free memory changes as the allocator caches blocks).
        """
        if self.chunk != "auto":
            return self.chunk
        device = torch.device(device)
        elt = torch.get_autocast_dtype(device.type).itemsize if torch.is_autocast_enabled(device.type) else 4
        size = (model.image_size, model.image_size) if size is None else (int(size[0]), int(size[1]))
        key = (id(model), str(device), elt, self.modality, size if self.modality == "image" else None)
        if key not in self._auto_chunks:
            if self.modality == "image":
                grid = model.grid_for(size)
                tokens, tower = model.n_prefix + grid[0] * grid[1], model.vision
                input_bytes = 3 * 3 * size[0] * size[1] * 4  # pixels, mask and masked copy, float32
            else:
                tokens, tower, input_bytes = model.context_length, model.text, 0
            self._auto_chunks[key] = auto_chunk(device, tokens, tower.width, tower.n_heads, input_bytes, elt)
            log.info("rise chunk: auto -> %d inputs per pass on %s", self._auto_chunks[key], device)
        return self._auto_chunks[key]

    @staticmethod
    def per_pass(batch: int, chunk: int) -> int:
        """Masks per forward pass for each of ``batch`` samples (about ``chunk`` inputs in all)."""
        return max(1, chunk // batch)

    def uses_compile(self, device: torch.device) -> bool:
        return self.compile is True or (self.compile == "auto" and torch.device(device).type == "cuda")

    def _compiled_forward(self, model: ClipAdapter, device: torch.device, rows: int):
        """(compiled unit image embedding, the row count every pass is padded to)."""
        key = (id(model), str(device), self.compile_backend)
        failed = key in self._compiled and self._compiled[key][0] is None  # (None, _): stay eager
        if not failed and (key not in self._compiled or self._compiled[key][1] < rows):
            self._compiled.clear()  # one model at a time; do not keep old graphs (or models) alive
            fn = torch.compile(model.encode_image, dynamic=False, backend=self.compile_backend)
            self._compiled[key] = (fn, max(rows, self.chunk_size(model, device)))
        return self._compiled[key]

    # --- masks ---------------------------------------------------------------------------------

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.mask_seed is None:
            return None  # reference behaviour: unseeded, fresh masks every call
        return torch.Generator(device=device).manual_seed(self.mask_seed)

    def image_masks(self, size: tuple[int, int], device: torch.device) -> RiseMasks:
        """The masks for images of ``size`` on ``device``: created once, then reused."""
        device = torch.device(device)
        key = (self.mask_seed, int(size[0]), int(size[1]), str(device))
        if self.mask_seed is None or key not in self._image_masks:
            masks = RiseMasks(self.n_masks, self.s, self.p1, size, device, self._generator(device))
            if self.mask_seed is None:
                return masks
            self._image_masks[key] = masks
        return self._image_masks[key]

    def text_masks(self, device: torch.device) -> RiseTextMasks:
        device = torch.device(device)
        key = (self.mask_seed, str(device))
        if self.mask_seed is None or key not in self._text_masks:
            masks = RiseTextMasks(self.n_masks_text, self.s_text, self.p1_text, device, self._generator(device))
            if self.mask_seed is None:
                return masks
            self._text_masks[key] = masks
        return self._text_masks[key]

    # --- image ---------------------------------------------------------------------------------

    def _image_scores(self, model: ClipAdapter, masked: Tensor, target: Tensor) -> Tensor:
        """(B, k, 3, H, W) masked images, (B, E) unit targets → (B, k) cosine scores."""
        b, k = masked.shape[:2]
        rows = masked.flatten(0, 1)
        if not self.uses_compile(rows.device):
            emb = model.encode_image(rows)
        else:
            try:  # a compiler failure costs speed, never the run: warn once and go eager
                forward, size = self._compiled_forward(model, rows.device, b * k)
                if forward is None:
                    emb = model.encode_image(rows)
                else:  # one static shape for every pass
                    pad = size - b * k
                    emb = forward(torch.cat([rows, rows.new_zeros(pad, *rows.shape[1:])]) if pad else rows)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:
                log.warning("rise: torch.compile failed (%s: %s); continuing without compilation "
                            "(set explainer.compile=false to skip it)", type(err).__name__,
                            str(err).splitlines()[0][:200] if str(err) else "")
                self._compiled = {(id(model), str(rows.device), self.compile_backend): (None, b * k)}
                emb = model.encode_image(rows)
        emb = emb[: b * k].view(b, k, -1)
        return (emb.float() * target.float()[:, None]).sum(-1)

    def explain_image(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        target = text_target(model, tokens)
        masks = self.image_masks(tuple(pixels.shape[-2:]), pixels.device)
        mean = model.vision.mean.to(dtype=pixels.dtype)[:, None]  # (1,1,3,1,1): 0 after normalisation
        x = pixels[:, None]  # (B,1,3,H,W)
        sal = torch.zeros(pixels.shape[0], *masks.size, device=pixels.device, dtype=torch.float32)
        per_pass = self.per_pass(pixels.shape[0], self.chunk_size(model, pixels.device, tuple(pixels.shape[-2:])))
        with torch.no_grad(), progress.task(masks.n, self.name, "mask", pixels.shape[0]) as done:
            for start in range(0, masks.n, per_pass):
                m = masks.chunk(start, min(start + per_pass, masks.n))  # (k,H,W)
                masked = mean + m[None, :, None].to(pixels.dtype) * (x - mean)  # (B,k,3,H,W)
                scores = self._image_scores(model, masked, target)  # (B,k)
                sal += torch.einsum("bk,khw->bhw", scores.float(), m.float())
                done.update(m.shape[0])
        return sal / (masks.n * masks.p1)

    # --- text ----------------------------------------------------------------------------------

    def _text_scores(self, model: ClipAdapter, tokens: TextTokens, mult: Tensor, target: Tensor) -> Tensor:
        """Score ``k`` masked variants of every caption: ``mult`` (B, k, L) scales the embedded tokens
        (``embedded``) or each position's token-table row before the other embeddings are added
        (``token_table``: ``rows·m + rest = input_embedding − rows·(1 − m)``, then the tower's norm)."""
        b, k, length = mult.shape
        tower = model.text
        m = mult.reshape(b * k, length, 1)
        rep = torch.arange(b, device=mult.device).repeat_interleave(k)
        if self.text_scaling == "embedded":
            x, bias = tower.embed(tokens)
            x = x[rep] * m.to(x.dtype)
        else:
            e, bias = tower.input_embedding(tokens)
            rows = tower.token_rows(tokens.ids)
            x = tower.embedding_norm(e[rep] - rows[rep] * (1 - m.to(e.dtype)))
        bias = repeat_bias(bias, b, k)  # per-sample (padding) bias follows its rows
        x, _ = tower.run(x, bias)
        emb = F.normalize(tower.pool(x, tokens.index(rep)).float(), dim=-1)
        return (emb.view(b, k, -1) * target.float()[:, None]).sum(-1)

    def _text_multipliers(self, tokens: TextTokens, masks: RiseTextMasks) -> tuple[Tensor, Tensor]:
        """Per-sample (B, N, L) masks: (each position's own mask value, the value applied to it).

        ``embedded``: the caption tokens get their mask, every other position 1; both the same.
        ``token_table``: the mask spans the start token, the caption and the end token (NIB's
        ``tid``); a token id that occurs at several positions has one table row, so every one of
        them is scaled by the mask of its last position (NIB's in-place row write, later wins)."""
        content = tokens.content_mask.bool()
        b, length = content.shape
        full = torch.ones(b, masks.n, length, device=content.device)
        table = self.text_scaling == "token_table"
        applied = full.clone() if table else full
        for i in range(b):
            n = int(content[i].sum())
            pos = torch.arange(n + 2, device=content.device) if table else content[i].nonzero().squeeze(-1)
            if pos.numel() == 0:
                continue
            full[i][:, pos] = masks.for_length(pos.numel())
            if table:
                ids = tokens.ids[i, pos]
                same = ids[:, None] == ids[None, :]  # (P, P): positions sharing a row
                last = torch.where(same, torch.arange(pos.numel(), device=ids.device), -1).amax(dim=1)
                applied[i][:, pos] = full[i][:, pos][:, last]
        return full, applied

    def explain_text(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        target = image_target(model, pixels)
        content = tokens.content_mask.bool()
        b, length = content.shape
        device = tokens.ids.device
        masks = self.text_masks(device)
        full, applied = self._text_multipliers(tokens, masks)
        sal = torch.zeros(b, length, device=device)
        per_pass = self.per_pass(b, self.chunk_size(model, device))
        with torch.no_grad(), progress.task(masks.n, self.name, "mask", b) as done:
            for start in range(0, masks.n, per_pass):
                mult = full[:, start : start + per_pass]  # (B,k,L): what each position's mask says
                scores = self._text_scores(model, tokens, applied[:, start : start + per_pass], target)  # (B,k)
                sal += torch.einsum("bk,bkl->bl", scores, mult)
                done.update(mult.shape[1])
        sal = sal / (masks.n * masks.p1)
        return sal * content
