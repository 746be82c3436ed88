"""ABM: Adversarial Bottleneck Method (METHODS.md §2.13).

The only public code is compiled bytecode in LMBTough/ABE-XAI
(``multimodel/salicncy/__pycache__/abm.cpython-312.pyc``), read by disassembly for METHODS.md;
this module is written from that specification and the ABM paper's Eq. 6 / Alg. 1 as summarised
there, not from the reference code.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import Explainer, SampleRng, grad, tower_for
from clip_xai.explainers.bottleneck import Repeated, Side, capacity, layout, repeat_rows, token_scores
from clip_xai.models.base import ClipAdapter
from clip_xai.progress import steps
from clip_xai.types import TextTokens

GRAD_ACCUMULATION = ("batched", "per_draw")


@contextlib.contextmanager
def in_float64(model: torch.nn.Module):
    """The model's floating parameters and buffers in float64 inside the block; each comes back in
    its own dtype on exit (float32 → float64 → float32 is exact, so the weights are restored bit
    for bit), also on error."""
    dtypes = {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}
    model.to(torch.float64)
    try:
        yield
    finally:
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name in dtypes and t.dtype != dtypes[name]:
                t.data = t.data.to(dtypes[name])


class ABM(Explainer):
    """Sign-gradient ascent of a bottleneck at the input of block ``target_layer``.

    z = the hidden state entering block ``target_layer`` (HF ``hidden_states[9]`` for 9: one
    block earlier than M2IB), detached, in fp32. x⁰ = z. Each of the T = ``steps`` steps:
    λ = x/z (detached); for ``noise_samples`` draws z̃ = x + (1 − λ)·ε, ε ~ N(0, 1) from
    :class:`SampleRng` (drawn at the real tokens only: a caption's padding gets none), sum
    ∂cos(f(z̃), e_other)/∂x over the draws; then
    x ← x + ``step_scale``·|z|/T · sign(summed gradient) (ascent) and clamp every element to
    [min(0, z), max(0, z)]. Final λ = x/z, μ = z·λ (= x), σ² = (1 − λ)²; the map is the
    capacity ``nansum`` over channels per token (patch grid, CLS dropped, for images).

    Choices and deviations:

    * Elements with z = 0 exactly: λ = x/z is 0/0 (the reference gets NaN, which would poison the
      forward). Here λ := 1 there during the steps (x is pinned to 0 by the clamp, so such an
      element is noise-free), and their capacity is NaN at the end so ``nansum`` drops it — what
      the reference's nansum does with its NaNs.
    * Text (``modality: text``): the same on the text tower, the target being the **image**
      embedding as in the ABM paper (Eq. 6, Alg. 1). The compiled reference passes the text's
      own feature instead (METHODS.md §2.13, "reference quirk"); that slip is not reproduced.
      After the optimisation λ := 1 (so μ = z, σ² = 0) at every position outside
      ``tokens.content_mask`` (start, end/pool and padding tokens, on the token axis: the
      reference's intent, its code pins the batch axis). The reference's extra ×0.05 on the first
      token is not applied: shared post-processing zeroes non-caption tokens anyway.
    * ``grad_accumulation``: ``batched`` (default) runs all draws as B·k rows of one pass and
      sums their gradients; ``per_draw`` runs one forward/backward per draw and
      adds the gradients in draw order, as the reference's loop over its 5 draws (a running
      ``total_grad``). The sums agree up to float rounding, but the sign step would turn a
      rounding difference in a near-zero sum into a full step of |z|/T that later steps carry
      along. Measured on CPU (float32) the two give identical maps and batched is ~1.35× cheaper,
      hence the default (docs/parity.md, deviations).
    * ``step_scale`` multiplies the per-element step |z|/T (1.0 = reference). With T = 0 the map
      is the no-bottleneck capacity ½Σ_d(z_d² − 1 − log 1e−9).
    * ``float64`` (default false): the whole computation (model forward, gradients, steps) in
      float64, for exact comparisons: the sign step turns float32 rounding in a near-zero gradient
      sum into a full step, so float32 maps reproduce across implementations only to r ≈ 0.997-0.999
      on some images, while two float64 implementations agree to ~1e-16. The model is converted for
      the call and restored bit for bit (:func:`in_float64`); the cost is measured in the docs.
    * ``debug`` (a dict, test hook): when ``record_path`` is true it receives ``z`` and ``path``
      (x⁰..x^T, each (B, N, D)).
    """

    modalities = frozenset({"image", "text"})
    requires = {"*": frozenset({"blocks"})}
    cpu_micro_batch = 4  # measured: 4 samples beat 1 on a 2-core CPU, 16 fall out of L3 (docs/performance.md)

    def __init__(self, name: str = "abm", modality: str = "image", steps: int = 10, target_layer: int = 9,
                 noise_samples: int = 5, step_scale: float = 1.0, grad_accumulation: str = "batched",
                 record_path: bool = False, float64: bool = False):
        super().__init__(name, modality)
        if not isinstance(float64, bool):
            raise ClipXaiError(f"abm float64={float64!r} must be true or false", "set explainer.float64=false")
        self.float64 = float64
        if grad_accumulation not in GRAD_ACCUMULATION:
            raise ClipXaiError(f"abm grad_accumulation={grad_accumulation!r} is not known",
                               "use explainer.grad_accumulation=" + " | ".join(GRAD_ACCUMULATION))
        self.grad_accumulation = grad_accumulation
        self.steps = steps
        self.target_layer = target_layer
        self.noise_samples = noise_samples
        self.step_scale = step_scale
        self.record_path = record_path
        self.debug: dict = {}

    def check_model(self, model: ClipAdapter) -> None:
        tower_for(model, self.modality).layer(self.target_layer)

    @staticmethod
    def _batched_gradient(rep: Repeated, layer: int, x: Tensor, lam: Tensor, eps: Tensor) -> Tensor:
        """Σ_j ∂cos(f(x + (1−λ)ε_j))/∂x from one pass over the B·k rows (k = eps.shape[1])."""
        b, k = eps.shape[:2]
        with torch.enable_grad():
            xr = repeat_rows(x, k).requires_grad_(True)
            zt = xr + (1 - repeat_rows(lam, k)) * eps.flatten(0, 1)
            (g,) = grad(rep.similarity(zt, layer), [xr])
        return g.view(b, k, *x.shape[1:]).sum(1)

    @staticmethod
    def _per_draw_gradient(rep: Repeated, layer: int, x: Tensor, lam: Tensor, eps: Tensor) -> Tensor:
        """The same sum as the reference forms it: one forward/backward per draw, added in order."""
        total = None
        for j in range(eps.shape[1]):
            with torch.enable_grad():
                xj = x.detach().requires_grad_(True)
                (g,) = grad(rep.similarity(xj + (1 - lam) * eps[:, j], layer), [xj])
            total = g if total is None else total + g
        return total

    def explain(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        if not self.float64:
            return self._explain(model, pixels, tokens, seeds)
        with in_float64(model):
            return self._explain(model, pixels.double(), tokens, seeds).float()

    def _explain(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        side = Side(model, self.modality, pixels, tokens)
        layer = side.tower.layer(self.target_layer)
        z, bias = side.hidden(layer)
        z = z.to(torch.promote_types(z.dtype, torch.float32))  # fp32, or fp64 on a float64 model
        b, n, d = z.shape
        k = self.noise_samples
        zero = z == 0
        safe_z = torch.where(zero, torch.ones_like(z), z)
        lo, hi = z.clamp(max=0), z.clamp(min=0)
        step = self.step_scale * z.abs() / max(self.steps, 1)
        gradient = self._per_draw_gradient if self.grad_accumulation == "per_draw" else self._batched_gradient
        rep = side.repeated(bias, 1 if self.grad_accumulation == "per_draw" else k)
        rng = SampleRng(seeds, z.device)
        real = side.real_tokens(n)
        x = z.clone()
        path = [x] if self.record_path else None
        for _ in steps(self.steps, self.name, samples=b):  # progress with the job's ETA
            lam = torch.where(zero, torch.ones_like(x), x / safe_z)
            eps = rng.normal_at(real, k, d)  # (B, k, N, D), zero on padding
            g = gradient(rep, layer, x, lam, eps)
            x = torch.clamp(x + step * g.sign(), lo, hi)
            if path is not None:
                path.append(x)
        lam = torch.where(zero, torch.ones_like(x), x / safe_z)
        if self.modality == "text":
            lam = torch.where(tokens.content_mask[..., None].to(lam.device), lam, torch.ones_like(lam))
        cap = capacity(z * lam, (1 - lam) ** 2).masked_fill(zero, float("nan"))
        if path is not None:
            self.debug = {"z": z, "path": path}
        return layout(model, self.modality, token_scores(cap))
