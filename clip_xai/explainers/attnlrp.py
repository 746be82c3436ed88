"""AttnLRP (Achtibat et al., "AttnLRP: Attention-Aware Layer-wise Relevance Propagation for
Transformers", ICML 2024; reference package ``lxt``, github.com/rachtibat/LRP-eXplains-Transformers).

Layer-wise relevance propagation of the explained score through the whole tower, computed as a
modified gradient in ONE backward pass (the Gradient×Input form ``lxt.efficient`` uses): the
tower is re-run block by block from its native weights (:class:`~clip_xai.models.base.BlockOps`
pieces) with the rules of :mod:`clip_xai.explainers.lrp_rules` on the tensors, and the relevance
of an input is ``input ⊙ ∂̃s/∂input``, summed over its channels.

Score: s = ⟨f/‖f‖, t⟩, the cosine of the explained embedding f with the other modality's unit
embedding t (a constant), the norm ‖f‖ under the identity rule (as ``lxt``'s ``normalize``), so
the relevances sum to s up to what the rules absorb (biases, LayerNorm shifts, softmax).

Rules (per ``lxt`` and the paper):

* LayerNorm (every one the tower runs: ``ln_pre``, block norms, ``ln_post``/``ln_final``, HF
  pre/post norms): identity rule on the normalisation (σ constant);
* MLP non-linearity (GELU, QuickGELU, any HF activation module): identity rule;
* linear layers, the patch convolution, residual additions, projections: ε-rule, ε → 0 (their
  gradient); biases, positional and class embeddings absorb their share;
* attention, per tower (``image_attention`` / ``text_attention``):
  ``attnlrp`` — the softmax rule (the softmax's own gradient) and the uniform rule on both
  bilinear products q·kᵀ and A·v (½ of the gradient to each factor; q and k get ¼, v ½, as
  ``lxt``'s ``wrap_attention_forward``); ``cp`` — CP-LRP (Ali et al. 2022): no relevance through
  q and k (the attention matrix is a constant), all of it through v. ``lxt`` uses ``cp`` inside
  the attention of Vision Transformers (its ViT patch map and ``MultiheadAttention_CP``; paper
  App. A.2.3: the softmax path in ViTs adds gradient noise that would need the z⁺ rule) and
  ``attnlrp`` in language models; the defaults follow that split.

The rules reach the activations and norms that sit inside the backends' native modules through
forward hooks that exist only during the call (registered on entry, removed in ``finally``), each
replacing the module's output by the same value carrying the rule's backward. A tower whose blocks
compute their non-linearity or norm outside a module (so the rule would silently not apply) is
refused after the forward.

Input layer: image maps are the relevance of the normalised pixels (``lxt``'s ViT example:
``input ⊙ grad`` on the preprocessed image), summed over colour channels, at image size
(``image_input: pixels``), or of the embedded tokens (patch embedding + position, before
``ln_pre``) on the patch grid (``image_input: tokens``). Text maps are the relevance of the
embedded tokens (token + position embedding, before any embedding norm), per position. Maps are
signed relevances (negative = evidence against the pair); the shared min-max keeps their order.

Not differentiable for ``map_attack``: the rules hold σ, f(x)/x and ‖f‖ constant, so a second
derivative of the map would miss their dependence on the pixels.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import Explainer, other_target, tower_for
from clip_xai.explainers.lrp_rules import identity_rule, layer_norm_identity, uniform, unit_identity
from clip_xai.models.base import BlockOps, ClipAdapter, Tower, merge_heads, split_heads
from clip_xai.types import TextTokens

ATTENTION_RULES = ("attnlrp", "cp")
IMAGE_INPUTS = ("pixels", "tokens")


def activation_types() -> tuple[type, ...]:
    """Module classes that are element-wise non-linearities in the supported backends: torch's,
    open_clip's QuickGELU and every class of transformers' ``ACT2CLS``."""
    types: list[type] = [nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish]
    with contextlib.suppress(ImportError):
        from open_clip.transformer import QuickGELU

        types.append(QuickGELU)
    with contextlib.suppress(ImportError):
        from transformers.activations import ACT2CLS

        types += [v[0] if isinstance(v, tuple) else v for v in ACT2CLS.values()]
    return tuple(t for t in dict.fromkeys(types) if isinstance(t, type) and issubclass(t, nn.Module))


@dataclass
class RuleCounts:
    """How many module outputs got a rule during one forward (checked against the block count)."""

    norms: int = 0
    activations: int = 0
    probs: list[Tensor] = field(default_factory=list)  # filled only when a caller asks (tests)
    scores: list[Tensor] = field(default_factory=list)


@contextlib.contextmanager
def module_rules(tower: Tower):
    """During the ``with``: every LayerNorm and element-wise activation module of ``tower`` returns
    its own output carrying the identity-rule backward. Hooks are removed on exit, also on error."""
    counts = RuleCounts()
    acts = activation_types()

    def on_norm(mod: nn.LayerNorm, args, out):
        counts.norms += 1
        return layer_norm_identity(args[0], out, mod.weight, mod.bias, mod.eps, len(mod.normalized_shape))

    def on_act(mod: nn.Module, args, out):
        counts.activations += 1
        return identity_rule(args[0], out)

    handles = []
    try:
        for mod in tower.modules():
            if isinstance(mod, nn.LayerNorm):
                handles.append(mod.register_forward_hook(on_norm))
            elif isinstance(mod, acts):
                handles.append(mod.register_forward_hook(on_act))
        yield counts
    finally:
        for h in handles:
            h.remove()


def lrp_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, rule: str,
                  counts: RuleCounts | None = None, keep: bool = False) -> Tensor:
    """softmax(q kᵀ/√dh + bias)·v (per head, (B,H,N,dh)) with the attention rule ``rule``."""
    if rule == "cp":
        q, k = q.detach(), k.detach()
    else:
        q, k = uniform(q), uniform(k)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(dim=-1)  # the AttnLRP softmax rule is the softmax's own Gradient×Input
    if keep and counts is not None:
        counts.scores.append(scores)
        counts.probs.append(probs)
    if rule == "attnlrp":
        probs, v = uniform(probs), uniform(v)
    return probs @ v


def lrp_block(block: BlockOps, x: Tensor, bias: Tensor | None, rule: str,
              counts: RuleCounts | None = None, keep: bool = False) -> Tensor:
    """One block from its BlockOps pieces, attention under ``rule`` (norms/activations: the hooks)."""
    q, k, v = (split_heads(t, block.n_heads) for t in block.qkv(block.pre_attn(x)))
    ctx = merge_heads(lrp_attention(q, k, v, bias, rule, counts, keep))
    return block.post_attn(x, block.out_proj(ctx))


def relevance_forward(tower: Tower, start: Tensor, bias: Tensor | None, inputs, target: Tensor, rule: str,
                      keep: bool = False) -> tuple[Tensor, RuleCounts]:
    """The explained score s (B,) from ``start`` (the summed input embedding, before
    ``embedding_norm``) with every rule applied; its graph carries the modified gradient."""
    with module_rules(tower) as counts:
        x = tower.embedding_norm(start)
        for block in tower.blocks:
            x = lrp_block(block, x, bias, rule, counts, keep)
        score = (unit_identity(tower.pool(x, inputs)) * target).sum(-1)
    n = tower.n_layers
    if counts.activations < n or counts.norms < 2 * n:
        raise ClipXaiError(
            f"attnlrp applied its rules to {counts.activations} non-linearities and {counts.norms} LayerNorms in a "
            f"{n}-block tower (expected at least {n} and {2 * n}): this backend computes some of them outside "
            "modules, where the identity rule cannot reach them",
            "use an open_clip, HF CLIP or AltCLIP model, or a method that needs no rules (explainer=saliency)",
        )
    return score, counts


class AttnLRP(Explainer):
    modalities = frozenset({"image", "text"})
    # blocks: the re-run; token_head: the head after the blocks is a norm and a projection (plus a
    # linear pooling), which the rules cover; an attentional pooler is not.
    requires = {"*": frozenset({"blocks", "token_head"})}
    differentiable = False

    def __init__(self, name: str = "attnlrp", modality: str = "image", image_attention: str = "cp",
                 text_attention: str = "attnlrp", image_input: str = "pixels"):
        super().__init__(name, modality)
        for key, value, allowed in (("image_attention", image_attention, ATTENTION_RULES),
                                    ("text_attention", text_attention, ATTENTION_RULES),
                                    ("image_input", image_input, IMAGE_INPUTS)):
            if value not in allowed:
                raise ClipXaiError(f"attnlrp {key}={value!r} is not known", f"use explainer.{key}=" + " | ".join(allowed))
        self.image_attention = image_attention
        self.text_attention = text_attention
        self.image_input = image_input

    def relevance(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, keep: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor, RuleCounts]:
        """(input, its modified gradient, score s, counts) for the explained modality. ``input`` is
        the normalised pixels for ``image_input: pixels``, else the summed input embedding."""
        tower = tower_for(model, self.modality)
        target = other_target(model, self.modality, pixels, tokens)
        rule = self.image_attention if self.modality == "image" else self.text_attention
        inputs = pixels if self.modality == "image" else tokens
        with torch.enable_grad():
            if self.modality == "image" and self.image_input == "pixels":
                px = pixels.detach().requires_grad_(True)
                start, bias = tower.input_embedding(px)
                leaf = px
            else:
                with torch.no_grad():
                    start, bias = tower.input_embedding(inputs)
                start = leaf = start.detach().requires_grad_(True)
            score, counts = relevance_forward(tower, start, bias, inputs, target, rule, keep)
            (g,) = torch.autograd.grad(score.sum(), [leaf])  # samples never interact: per-sample exact
        if leaf is not start:  # pixels: relevance of the normalised pixels (p−μ)/σ ⊙ σ∂s/∂p = (p−μ) ⊙ ∂s/∂p
            return (pixels - tower.mean.to(pixels.dtype)), g, score.detach(), counts
        return start.detach(), g, score.detach(), counts

    def explain(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        x, g, _, _ = self.relevance(model, pixels, tokens)
        if self.modality == "text":
            return (x * g).sum(-1)
        if self.image_input == "pixels":
            return (x * g).sum(1)
        return model.patch_map((x * g).sum(-1))
