"""Second-order caption–image interactions: a caption-token × image-patch matrix per pair.

Möller, Tilli, Vu & Padó, "Explaining Caption-Image Interactions in CLIP Models with Second-Order
Attributions", TMLR 2025 (arXiv 2408.14153); authors' package ``exclip`` (github.com/lucasmllr/exCLIP,
``exclip/explanation.py``), which this module matches (docs: parity). Written from the paper's
equations and a reading of that code, not copied from it.

What is attributed. The score is the dot product of the two *raw* (projected, unnormalised)
embeddings, s(t, i) = e_T(t)·e_I(i). Each tower is cut at the input of one block (``text_layer``,
``image_layer``; default the last block, exclip's ``layer=11`` on 12-block towers) into a
hidden state h and the rest of the tower e(h). Along the straight path from a reference r to the
input's state x, the integrated Jacobian J̄ = ∫₀¹ ∂e/∂h(r + α(x − r)) dα gives e(x) − e(r) = J̄ (x − r)
exactly (the gradient theorem), so

    (e_T(t) − e_T(r_T)) · (e_I(i) − e_I(r_I)) = Σ_{s,p} Σ_{d,d'} (x_T − r_T)[s,d] (J̄_Tᵀ J̄_I)[(s,d),(p,d')] (x_I − r_I)[p,d']

and the summand, summed over the hidden dims d, d' of token s and image token p, is the
interaction A[s, p] (the paper's second-order attribution: J̄_Tᵀ J̄_I is the integrated mixed
Hessian ∂²s/∂h_T∂h_I). Like exclip, A is divided by ‖e_T(t)‖·‖e_I(i)‖ (the input embeddings' norms),
so it is on the scale of the cosine; ``sum(A)`` then equals the left side over those norms up to
the integration error of ``steps`` points (the completeness the paper states; tested).

Exactly as exclip (``Explainer.explain`` with its defaults):

* references: the image of zeros *after* normalisation (every pixel at the model's mean colour)
  and the caption ``<start> x <end>`` then x to the caption's length (not the pad id), x = id 0 on CLIP BPE (exclip's
  ``_make_txt_ref``; the adapter's ``mask_token_id`` elsewhere; ``reference_token`` changes it);
* the path: α = 1, (N−1)/N, …, 1/N (N = ``steps`` = 10, right Riemann sum, the reference itself
  excluded), gradients taken at the interpolated hidden states, averaged over the N points;
* the text tower pools every interpolated sequence at the caption's end token; the image matrix
  drops the class-token column (kept internally for the completeness check).

How it is computed (cheaper than exclip's E backward passes per tower and an (S_T·D_T) × (S_I·D_I)
matrix, with identical results): the text side's per-token contributions
C_T[s] = J̄_T (x_T − r_T)|_s ∈ R^E come from forward-mode derivatives (one tangent per caption token
and path point); then A[s, ·] is ONE vector–Jacobian product of the image tail per caption token,
with C_T[s] as the cotangent, contracted with (x_I − r_I). Rows (sample × path point × token) are
processed in batched passes of at most ``chunk`` rows, with progress.

Maps. The matrix is kept (``explain_matrix``: (B, L, h, w), zero rows at padding) so the studies
can compare it; the image map sums it over the caption's token rows (``rows``: ``all`` real tokens,
start and end included, or ``content`` only), the text map sums it over the patches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.base import Explainer, tower_for
from clip_xai.models.base import ClipAdapter, Tower
from clip_xai.progress import task
from clip_xai.types import TextTokens

ROWS = ("all", "content")


@dataclass
class Interactions:
    """Second-order attributions of a batch before any reduction.

    ``tokens_x_image``: (B, L, N_I) interactions of text position s with image token p (class token
    included, ``n_prefix`` first), zero at text positions that are not real tokens; divided by
    ``norm`` = ‖e_T(t)‖·‖e_I(i)‖ (B,). ``embeddings`` holds the raw embeddings of the inputs and of the
    references, (text, text_ref, image, image_ref), each (B, E), for the completeness check.
    """

    tokens_x_image: Tensor
    norm: Tensor
    embeddings: tuple[Tensor, Tensor, Tensor, Tensor]


def path_points(steps: int) -> Tensor:
    """α of the N path points, 1, (N−1)/N, …, 1/N (exclip: ``torch.arange(1, 0, -1/N)``)."""
    return torch.arange(steps, 0, -1, dtype=torch.float64) / steps


def reference_pixels(model: ClipAdapter, like: Tensor) -> Tensor:
    """(1, 3, H, W) [0, 1] pixels at the tower's mean colour: exactly 0 after normalisation (exclip's
    image reference is a tensor of zeros fed to the normalised-input encoder)."""
    mean = model.vision.mean.to(device=like.device, dtype=like.dtype)
    return mean.expand(1, 3, *like.shape[-2:]).contiguous()


def reference_tokens(model: ClipAdapter, tokens: TextTokens, filler: int) -> TextTokens:
    """Per caption, ``<first real token> filler <last real token>`` then ``filler`` to the caption's
    length, the first three attended. On CLIP BPE with filler 0 this is exclip's ``[49406, 0, 49407, 0, …]``
    (a zero tensor with start and end written in). The tail is the filler, not the tokenizer's pad
    id: the interpolated captions are pooled at the caption's end position, which lies in this tail,
    so its id enters the map; HF CLIP pads with the end token (49407) where open_clip pads with 0, and
    padding with ``model.pad_id`` made the two backends' maps of the same network differ (image
    map 0.41, text map 0.21 on the test twins)."""
    ids, real = tokens.ids, tokens.attention_mask.bool()
    if bool((real.sum(1) < 2).any()):
        raise ClipXaiError("a caption has fewer than two real tokens (no start and end token)",
                           "tokenise captions with the model's own tokenizer")
    if ids.shape[1] < 3:
        raise ClipXaiError(f"the text reference needs 3 positions, the captions have {ids.shape[1]}",
                           "do not trim the token ids below three positions")
    last = (real.long() * torch.arange(ids.shape[1], device=ids.device)).argmax(1)
    ref = torch.full_like(ids, filler)
    ref[:, 0] = ids[:, 0]
    ref[:, 1] = filler
    ref[:, 2] = ids.gather(1, last[:, None])[:, 0]
    mask = torch.zeros_like(tokens.attention_mask)
    mask[:, :3] = 1
    return model.tokens_from_ids(ref, mask)


def _rows(bias: Tensor | None, index: Tensor) -> Tensor | None:
    """The attention bias for rows drawn from samples ``index`` (a per-sample bias is gathered)."""
    return bias[index] if bias is not None and bias.dim() == 4 and bias.shape[0] > 1 else bias


def _token_rows(tokens: TextTokens, index: Tensor) -> TextTokens:
    """The token rows of samples ``index`` (ids and pooling positions; caption strings not needed)."""
    return TextTokens(tokens.ids[index], tokens.attention_mask[index], tokens.pool_index[index],
                      tokens.content_mask[index])


def _cut(tower: Tower, inputs, layer: int) -> tuple[Tensor, Tensor | None]:
    """(hidden state entering block ``layer``, attention bias) of ``inputs``."""
    x, bias = tower.embed(inputs)
    return tower.run(x, bias, stop=layer)[0], bias


def _trim(tokens: TextTokens, minimum: int) -> TextTokens:
    """The positions up to the last real/pooled one (at least ``minimum``): exact for causal or
    padding-masked towers (see ``TextTokens.trimmed``), and the padding rows are zero anyway."""
    n = min(tokens.ids.shape[1], max(tokens.trimmed().ids.shape[1], minimum))
    return TextTokens(tokens.ids[:, :n], tokens.attention_mask[:, :n], tokens.pool_index,
                      tokens.content_mask[:, :n], tokens.texts)


def second_order(model: ClipAdapter, pixels: Tensor, tokens: TextTokens, steps: int = 10, image_layer: int = -1,
                 text_layer: int = -1, filler: int = 0, chunk: int = 64, desc: str = "interactions") -> Interactions:
    """The caption-token × image-token interactions of each (image, caption) pair (module docstring)."""
    vision, text = model.vision, model.text
    li, lt = vision.layer(image_layer), text.layer(text_layer)
    full_len = tokens.ids.shape[1]
    tok = _trim(tokens, 3)
    ref_tok = reference_tokens(model, tok, filler)
    real = tok.attention_mask.bool()
    b, n = tok.ids.shape
    alphas = path_points(steps).to(pixels.device)
    pos0 = torch.zeros(1, dtype=torch.long, device=pixels.device)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # the math kernel has forward-mode and batched-vjp rules
        x_t, bias_t = _cut(text, tok, lt)
        r_t, bias_r = _cut(text, ref_tok, lt)
        x_i, bias_i = _cut(vision, pixels, li)
        r_i, _ = _cut(vision, reference_pixels(model, pixels), li)
        emb = (text.pool(text.run(x_t, bias_t, start=lt)[0], tok), text.pool(text.run(r_t, bias_t, start=lt)[0], tok),
               vision.pool(vision.run(x_i, bias_i, start=li)[0], pixels),
               vision.pool(vision.run(r_i, _rows(bias_i, pos0), start=li)[0], pixels[:1]).expand(b, -1))
        d_t = (x_t - r_t) * real[..., None]
        d_i = x_i - r_i
        e_dim = emb[0].shape[-1]
        acc = torch.promote_types(x_i.dtype, torch.float32)  # accumulate in float32 at least

        # text side: C_T[b, s] = (1/N) Σ_k J_T(r + α_k δ) (δ restricted to token s), by forward mode
        pos = real.nonzero()  # (R, 2): sample, token
        grid = torch.cartesian_prod(torch.arange(len(pos), device=pos.device), torch.arange(steps, device=pos.device))
        n_text = -(-len(grid) // chunk)
        step_i = max(1, min(steps, chunk // b))
        tok_i = max(1, chunk // (b * step_i))
        n_image = -(-steps // step_i) * -(-n // tok_i)
        c_t = torch.zeros(b, n, e_dim, device=pixels.device, dtype=acc)
        with task(n_text + n_image, desc, unit="pass", samples=b) as progress:
            for rows in grid.split(chunk):
                sample, token = pos[rows[:, 0], 0], pos[rows[:, 0], 1]
                alpha = alphas[rows[:, 1]].to(x_t.dtype)[:, None, None]
                primal = r_t[sample] + alpha * d_t[sample]
                tangent = torch.zeros_like(primal)
                at = torch.arange(len(rows), device=primal.device)
                tangent[at, token] = d_t[sample, token]
                with fwAD.dual_level():
                    out, _ = text.run(fwAD.make_dual(primal, tangent), _rows(bias_t, sample), start=lt)
                    jvp = fwAD.unpack_dual(text.pool(out, _token_rows(tok, sample))).tangent
                c_t.index_put_((sample, token), jvp.to(acc) / steps, accumulate=True)
                progress.update()

            # image side: A[b, s, :] = (1/N) Σ_k [C_T[b, s]ᵀ J_I(r + α_k δ)] · δ, one batched vjp per token
            out_a = torch.zeros(b, n, x_i.shape[1], device=pixels.device, dtype=acc)
            for ks in torch.arange(steps, device=pixels.device).split(step_i):
                sample = torch.arange(b, device=pixels.device).repeat_interleave(len(ks))
                alpha = alphas[ks].repeat(b).to(x_i.dtype)[:, None, None]
                with torch.enable_grad():
                    h = (r_i + alpha * d_i[sample]).requires_grad_(True)
                    e = vision.pool(vision.run(h, _rows(bias_i, sample), start=li)[0], pixels[sample])
                    chunks = torch.arange(n, device=pixels.device).split(tok_i)
                    for j, ts in enumerate(chunks):
                        cot = c_t[sample][:, ts].transpose(0, 1).to(e.dtype)  # (tokens, rows, E)
                        (g,) = torch.autograd.grad(e, h, cot, is_grads_batched=True, retain_graph=j < len(chunks) - 1)
                        part = (g.to(acc) * d_i[sample].to(acc)).sum(-1)  # (tokens, rows, N_I)
                        out_a[:, ts] += part.view(len(ts), b, len(ks), -1).sum(2).transpose(0, 1) / steps
                        progress.update()
    norm = emb[0].to(acc).norm(dim=-1) * emb[2].to(acc).norm(dim=-1)
    out_a = out_a / norm[:, None, None]
    if n < full_len:
        out_a = torch.cat([out_a, out_a.new_zeros(b, full_len - n, out_a.shape[-1])], dim=1)
    return Interactions(out_a, norm, tuple(e.to(acc) for e in emb))


class SecondOrderInteractions(Explainer):
    """Caption-token × image-patch interactions (Möller et al., TMLR 2025); module docstring.

    ``steps``: path points N (exclip 10). ``image_layer``/``text_layer``: the block whose input is
    attributed (−1 = the last, exclip's 11 on ViT-B). ``reference_token``: the id between the start
    and end token of the text reference; null = the adapter's ``mask_token_id``, the id the
    M2IB protocol writes into dropped tokens (CLIP BPE: 0, exclip's; AltCLIP: the pad id). ``rows``: caption rows
    summed into the image map (``all`` real tokens, as the matrix sums to the score change, or
    ``content``). ``chunk``: most rows (sample × path point × token) of one batched pass (memory).
    """

    modalities = frozenset({"image", "text"})
    #: both towers are cut at a block (checked for the other tower in :meth:`check_requirements`)
    requires = {"*": frozenset({"blocks"})}
    #: the map is a Riemann sum of Jacobian products taken under no_grad / forward-mode AD; a map
    #: attack would need third derivatives through it
    differentiable = False
    has_matrix = True

    def __init__(self, name: str = "interactions", modality: str = "image", steps: int = 10, image_layer: int = -1,
                 text_layer: int = -1, reference_token: int | None = None, rows: str = "all", chunk: int = 64):
        super().__init__(name, modality)
        if int(steps) < 1 or int(chunk) < 1:
            raise ClipXaiError(f"{name} needs steps >= 1 and chunk >= 1 (got steps={steps}, chunk={chunk})",
                               "use explainer.steps=10 (exclip) and a positive explainer.chunk")
        if rows not in ROWS:
            raise ClipXaiError(f"{name} rows={rows!r} is not known", "use explainer.rows=" + " | ".join(ROWS))
        self.steps = int(steps)
        self.image_layer = int(image_layer)
        self.text_layer = int(text_layer)
        self.reference_token = reference_token
        self.rows = rows
        self.chunk = int(chunk)

    def check_requirements(self, model: ClipAdapter) -> None:
        """Both towers must open at a block (the base class checks the explained one)."""
        super().check_requirements(model)
        other = "text" if self.modality == "image" else "image"
        tower = tower_for(model, other)
        if "blocks" not in tower.provides:
            raise ClipXaiError(
                f"explainer {self.name} cannot run on model {model.name}: it cuts both towers at a block, and the "
                f"{other} tower has none to cut, because {tower.missing.get('blocks', 'it does not provide blocks')}",
                "use a ViT CLIP whose towers the adapter runs block by block (e.g. model=vit_b16, model=tiny)",
            )
        model.grid  # noqa: B018  (a patch grid, or one clear error)

    def check_model(self, model: ClipAdapter) -> None:
        model.vision.layer(self.image_layer)
        model.text.layer(self.text_layer)

    def filler(self, model: ClipAdapter) -> int:
        """The text reference's middle token id (see the class docstring)."""
        return int(model.mask_token_id if self.reference_token is None else self.reference_token)

    def explain_matrix(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        """(B, L, h, w): interactions of each text position with each patch (class token dropped)."""
        res = second_order(model, pixels, tokens, self.steps, self.image_layer, self.text_layer, self.filler(model),
                           self.chunk, self.name)
        h, w = model.grid_for(pixels)  # the input's grid (keep-size mode: any size)
        a = res.tokens_x_image[:, :, model.n_prefix:]
        return a.reshape(a.shape[0], a.shape[1], h, w)

    def map_from_matrix(self, matrix: Tensor, tokens: TextTokens) -> Tensor:
        """Image map (B, h, w): sum over the caption rows; text map (B, L): sum over the patches."""
        if self.modality == "text":
            return matrix.sum((-2, -1))
        keep = tokens.attention_mask.bool() if self.rows == "all" else tokens.content_mask.bool()
        return (matrix * keep[:, :, None, None].to(matrix.device, matrix.dtype)).sum(1)

    def explain(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        return self.map_from_matrix(self.explain_matrix(model, pixels, tokens, seeds), tokens)
