"""M2IB: multi-modal information bottleneck attribution (METHODS.md §2.8).

Wang, Rudner & Wilson, "Visual Explanations of Image-Text Representations via Multi-Modal
Information Bottleneck Attribution", NeurIPS 2023; reference code YingWANGG/M2IB
(``scripts/iba.py``, ``scripts/methods.py``). Written from the specification, not from that code.
"""
from __future__ import annotations

import torch
from torch import Tensor

from clip_xai.explainers.base import Explainer, SampleRng, tower_for
from clip_xai.explainers.bottleneck import Repeated, Side, capacity, layout, repeat_rows, token_scores
from clip_xai.models.base import ClipAdapter
from clip_xai.progress import steps
from clip_xai.types import TextTokens


class M2IB(Explainer):
    """Per-sample bottleneck after block ``layer`` trained for ``steps`` Adam steps.

    For each sample a parameter α (N, D) starts at ``init`` (5.0); λ = sigmoid(α). The output of
    block ``layer`` (the input of block ``layer + 1``; all tokens, CLS/SOT/EOT included) is
    replaced by λ·h + (1−λ)·ε with ε ~ N(0, 1) drawn per sample from :class:`SampleRng`, for
    ``copies`` noise copies per sample (run as B·copies rows). The loss of a sample is
    ``beta · mean(capacity) − mean over copies cos(f(t), target)``, the capacity mean taken over
    the real tokens × channels (a caption's padding is excluded: the reference explains unpadded
    ``tokenizer.encode`` ids, so averaging over 77 padded positions made β ~10× weaker on short
    captions; padding positions also get no noise); samples' losses are summed,
    so each sample's α gets exactly its single-sample gradient (Adam is per element, so batch
    mates never interact). The map is the capacity (μ = λh, σ² = (1−λ)², features not
    standardised: the reference estimator has mean 0, std 1) of the **last** training forward
    (λ before the final Adam update, as in the reference), ``nansum`` over channels; copies share
    λ and h, so the reference's average over copies is that same value.

    Choices: the blocks before the bottleneck run once (their output does not depend on α);
    the other modality's embedding is computed once, unperturbed (the reference runs it in the
    same forward, which is equivalent). Text modality: the same on the text tower against the
    image embedding, per token over the full sequence (masking to caption tokens is shared
    post-processing). The capacity uses the exact ``log σ²`` of the reference (ABM's reference adds 1e−9,
    which would cap elements whose α grows during training: after 10 Adam steps at lr 1, α reaches
    ~15, σ² ~1e−13). ``lambda_override`` (test hook, not a hyperparameter) fixes λ everywhere and
    skips training; λ = 1 leaves the embedding unchanged.
    """

    modalities = frozenset({"image", "text"})
    requires = {"*": frozenset({"blocks"})}
    cpu_micro_batch = 4  # measured: 2-4 samples beat 1 on a 2-core CPU, 16 fall out of L3 (docs/performance.md)

    def __init__(self, name: str = "m2ib", modality: str = "image", layer: int = 9, beta: float = 0.1,
                 steps: int = 10, lr: float = 1.0, copies: int = 10, init: float = 5.0,
                 lambda_override: float | None = None):
        super().__init__(name, modality)
        self.layer = layer
        self.beta = beta
        self.steps = steps
        self.lr = lr
        self.copies = copies
        self.init = init
        self.lambda_override = lambda_override

    def check_model(self, model: ClipAdapter) -> None:
        tower_for(model, self.modality).layer(self.layer)

    def _setup(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens):
        side = Side(model, self.modality, pixels, tokens)
        start = side.tower.layer(self.layer) + 1  # the bottleneck edits the input of this block
        h, bias = side.hidden(start)
        return side, start, h.float(), side.repeated(bias, self.copies)

    def _noise(self, rng: SampleRng, real: Tensor, d: int) -> Tensor:
        """ε for the B·copies rows, drawn at the real tokens only (zero on padding)."""
        return rng.normal_at(real, self.copies, d).flatten(0, 1)

    def _bottleneck(self, rep: Repeated, start: int, h: Tensor, lam: Tensor, eps: Tensor) -> Tensor:
        """cos of the B·copies bottlenecked rows, averaged per sample → (B,)."""
        lam_r = repeat_rows(lam, self.copies)
        t = lam_r * repeat_rows(h, self.copies) + (1 - lam_r) * eps
        return rep.similarity(t, start).view(h.shape[0], self.copies).mean(1)

    def bottleneck_embeddings(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor,
                              lam: float) -> Tensor:
        """Test hook: unit embeddings (B, copies, E) of the explained tower with a constant λ."""
        side, start, h, rep = self._setup(model, pixels, tokens)
        b, n, d = h.shape
        eps = self._noise(SampleRng(seeds, h.device), side.real_tokens(n), d)
        lam_r = torch.full((b * self.copies, n, d), float(lam), device=h.device)
        t = lam_r * repeat_rows(h, self.copies) + (1 - lam_r) * eps
        with torch.no_grad():
            out, _ = side.tower.run(t.to(h.dtype), rep.bias, start=start)
            emb = torch.nn.functional.normalize(side.tower.pool(out, rep.inputs), dim=-1)
        return emb.view(b, self.copies, -1)

    def explain(self, model: ClipAdapter, pixels: Tensor, tokens: TextTokens, seeds: Tensor) -> Tensor:
        side, start, h, rep = self._setup(model, pixels, tokens)
        rng = SampleRng(seeds, h.device)
        if self.lambda_override is not None:
            lam = torch.full_like(h, float(self.lambda_override))
            return layout(model, self.modality, token_scores(capacity(lam * h, (1 - lam) ** 2, log_eps=0.0)))
        real = side.real_tokens(h.shape[1])
        weight = (real.float() / (real.sum(1, keepdim=True) * h.shape[2]))[..., None]  # mean over real (N, D)
        alpha = torch.full_like(h, float(self.init)).requires_grad_(True)
        opt = torch.optim.Adam([alpha], lr=self.lr)
        cap = None
        with torch.enable_grad():
            for _ in steps(self.steps, self.name, samples=h.shape[0]):  # progress with the job's ETA
                lam = torch.sigmoid(alpha)
                cos = self._bottleneck(rep, start, h, lam, self._noise(rng, real, h.shape[2]))
                cap = capacity(lam * h, (1 - lam) ** 2, log_eps=0.0)
                loss = (self.beta * (cap * weight).sum(dim=(1, 2)) - cos).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        if cap is None:  # steps = 0: the initial bottleneck
            lam = torch.sigmoid(alpha.detach())
            cap = capacity(lam * h, (1 - lam) ** 2, log_eps=0.0)
        return layout(model, self.modality, token_scores(cap.detach()))
