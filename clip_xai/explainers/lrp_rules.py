"""AttnLRP propagation rules as modified gradients (the Gradient×Input form of LRP).

Achtibat et al., "AttnLRP: Attention-Aware Layer-wise Relevance Propagation for Transformers",
ICML 2024 (reference package ``lxt``, ``lxt/efficient``); the Gradient×Input formulation is the
one of Arras et al. 2025 ("Close Look at Decomposition-based XAI-Methods for Transformer Language
Models"), which ``lxt.efficient`` implements. Written from the paper and from reading ``lxt``; no
code copied.

In this form every tensor ``t`` carries the relevance ``R_t = t ⊙ ∂̃s/∂t``, where ``∂̃`` is the
ordinary gradient except at the operations below, whose backward is replaced so that
``t ⊙ ∂̃s/∂t`` equals the paper's rule. Operations not listed keep their gradient, which *is* the
rule the paper uses for them:

* linear maps (``nn.Linear``, the patch convolution, projections, additions): the ε-rule with
  ε → 0 (LRP-0); a bias ``b`` absorbs ``b ⊙ ∂̃s/∂y`` of the relevance;
* softmax: the AttnLRP softmax rule ``R_in = x ⊙ (R_out − s ⊙ ΣR_out)`` (paper Prop. 3.3) is
  exactly Gradient×Input of the softmax, so the softmax keeps its gradient (in ``attnlrp``
  attention); it is not conservative: it absorbs ``ΣR_out − ΣR_in``.

Modified backwards (all autograd Functions, applied to tensors inside the re-run, never to modules):

* :func:`identity_rule` — element-wise non-linearities (GELU, QuickGELU): ``R_in = R_out``
  (paper Eq. 9), i.e. the gradient ``f(x)/x``;
* :func:`layer_norm_identity` — LayerNorm: identity rule on the normalisation, i.e. the
  standard deviation is a constant (paper Prop. 3.4; ``lxt`` stops its gradient), the centring
  and the affine part keep theirs;
* :func:`uniform` — bilinear products (``q·kᵀ`` and ``A·v``): each factor gets half of the
  product's relevance (the uniform rule, paper Eq. 7), i.e. half the gradient;
* :func:`unit_identity` — the L2 normalisation of the explained embedding (identity rule, as
  ``lxt``'s ``normalize``): the norm is a constant.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function


class _IdentityRule(Function):
    """y = f(x) with the gradient f(x)/x (0 where x == 0, where f(0) = 0 for GELU-type f)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:
        ctx.save_for_backward(torch.where(x == 0, torch.zeros_like(y), y / x))
        return y.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        (ratio,) = ctx.saved_tensors
        return g * ratio, None


def identity_rule(x: Tensor, y: Tensor) -> Tensor:
    """``y`` (the value of an element-wise non-linearity at ``x``) whose relevance flows to ``x``
    unchanged: ``x ⊙ ∂̃/∂x = y ⊙ ∂̃/∂y``. ``y`` is used as a constant (its own graph is dropped)."""
    return _IdentityRule.apply(x, y.detach())


class _LayerNormIdentity(Function):
    """LayerNorm value with the gradient of ``(x − mean(x))/σ ⊙ w + b`` at constant σ (and the
    ordinary gradient of the shift ``b``, so its absorbed relevance ``b ⊙ ∂̃s/∂b`` can be counted)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                n_dims: int) -> Tensor:
        dims = tuple(range(-n_dims, 0))
        wide = x if x.dtype in (torch.float32, torch.float64) else x.float()  # half precision: σ in float32
        sigma = (wide.var(dim=dims, unbiased=False, keepdim=True) + eps).sqrt().to(x.dtype)
        ctx.dims = dims
        ctx.save_for_backward(sigma, weight if weight is not None else torch.ones((), dtype=x.dtype, device=x.device))
        return y.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        sigma, weight = ctx.saved_tensors
        gn = g * weight / sigma  # gradient at the centred input
        gb = None
        if ctx.needs_input_grad[3]:
            gb = g.sum(dim=tuple(range(g.dim() - len(ctx.dims))))
        return gn - gn.mean(dim=ctx.dims, keepdim=True), None, None, gb, None, None


def layer_norm_identity(x: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                        n_dims: int) -> Tensor:
    """``y`` = LayerNorm(x) over the last ``n_dims`` dims, propagated with σ held constant.

    ``y`` is the native module's output (its value is kept bit for bit; its graph is dropped), so
    a backend's own LayerNorm (float32 casts included) decides the forward. ``bias`` gets its
    ordinary gradient (only computed when it requires grad: conservation checks)."""
    w = None if weight is None else weight.detach()
    return _LayerNormIdentity.apply(x, y.detach(), w, bias, float(eps), n_dims)


class _ScaleGrad(Function):
    @staticmethod
    def forward(ctx, t: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g * ctx.factor, None


def uniform(t: Tensor, share: float = 0.5) -> Tensor:
    """``t`` as one factor of a bilinear product: its gradient is multiplied by ``share`` (½:
    the uniform rule splits a product's relevance equally between its two factors)."""
    return _ScaleGrad.apply(t, share)


def unit_identity(e: Tensor) -> Tensor:
    """``e / ‖e‖`` over the last dim with the norm a constant (identity rule on the normalisation)."""
    return e / e.norm(dim=-1, keepdim=True).detach()
