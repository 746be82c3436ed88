"""Model-randomisation sanity check (Adebayo et al. 2018, "Sanity checks for saliency maps").

Per batch: the original map (image or text, as ``explainer.modality`` says) and the image–text
similarity, then for every randomised state of the tower — nothing randomised, the cascading
states (units re-initialised from the output down, one more per state) and the independent
states (one unit at a time) — the map and similarity of the randomised model and the similarity
of its map to the original (:class:`clip_xai.metrics.randomisation.RandomisationMetrics`). One
row per sample × state. The units (``study.scope``): ``model`` (default) = the output head
(``ln_post``, ``proj``), the blocks from the top down, then the stem (patch/token embedding, class
and position embeddings, ``ln_pre``): the order of Adebayo et al. (2018) and Quantus' MPRT;
``blocks`` = the transformer blocks only. The weights are re-drawn once per unit, seeded from
``seed`` (:class:`clip_xai.models.randomise.TowerRandomiser`), and restored after every state.

The state with nothing randomised must give similarity 1 (the explainer is seeded per sample);
a method passes the check when its curve falls towards 0 as blocks are randomised.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from clip_xai.errors import ClipXaiError
from clip_xai.explainers.postprocess import image_maps, text_maps
from clip_xai.metrics.complexity import column_names, complexity_columns
from clip_xai.models.randomise import HEAD, SCOPES, STEM, TowerRandomiser, cascading_states, independent_states, unit_label
from clip_xai.schema import RANDOMISATION_COLUMNS, RESULTS_FILE
from clip_xai.studies.base import Prepared, RunContext, Study, to_uint8_images

MODES = {"cascading": lambda n, scope: cascading_states(n, include_none=False, scope=scope),
         "independent": independent_states}
RAND_METRICS = ["rand_spearman", "rand_ssim", "rand_topk"]


class RandomisationStudy(Study):
    columns = RANDOMISATION_COLUMNS
    metric_columns = [*RAND_METRICS, "sim_orig", "sim_rand", *column_names(), *column_names("rand")]
    metrics_suite = "randomisation"

    def __init__(self, name: str = "randomisation", tower: str = "auto",
                 modes: tuple[str, ...] | list[str] = ("cascading", "independent"), scope: str = "model"):
        super().__init__(name)
        unknown = [m for m in modes if m not in MODES]
        if unknown or not modes:
            raise ClipXaiError(f"unknown randomisation modes {unknown or modes!r}",
                               f"set study.modes to a list drawn from {list(MODES)}")
        if tower not in ("auto", "vision", "text"):
            raise ClipXaiError(f"unknown tower {tower!r}", "set study.tower=auto, vision or text")
        if scope not in SCOPES:
            raise ClipXaiError(f"unknown randomisation scope {scope!r}",
                               "set study.scope=model (head, blocks, stem) or blocks (transformer blocks only)")
        self.tower = tower
        self.modes = list(modes)
        self.scope = scope
        self._randomiser: TowerRandomiser | None = None

    def tower_of(self, ctx: RunContext) -> str:
        if self.tower != "auto":
            return self.tower
        return "vision" if ctx.explainer.modality == "image" else "text"

    def randomiser(self, ctx: RunContext) -> TowerRandomiser:
        r = self._randomiser
        if r is None or r.model is not ctx.model or r.tower_name != self.tower_of(ctx) or r.seed != ctx.seed:
            r = self._randomiser = TowerRandomiser(ctx.model, self.tower_of(ctx), ctx.seed)
        return r

    def states(self, n_layers: int) -> list[tuple[str, tuple]]:
        """(mode, randomised units) in row order; the first state randomises nothing."""
        return [("none", ())] + [(m, s) for m in self.modes for s in MODES[m](n_layers, self.scope)]

    @staticmethod
    def block_column(unit, n_layers: int) -> int:
        """The ``block`` value of a state whose last randomised unit is ``unit``: the block index,
        ``n_layers`` for the head (above the top block), -2 for the stem, -1 for nothing."""
        return -1 if unit is None else n_layers if unit == HEAD else -2 if unit == STEM else int(unit)

    def _maps(self, ctx: RunContext, prep: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
        """(post-processed map, image–text cosine) of the model in its current state."""
        raw = ctx.explainer(ctx.model, prep.pixels, prep.tokens, prep.seeds).float()
        if ctx.explainer.modality == "image":
            maps = image_maps(raw, tuple(prep.pixels.shape[-2:]))
        else:
            maps = text_maps(raw, prep.tokens.content_mask)
        with torch.no_grad():
            sim = (ctx.model.encode_image(prep.pixels).float() * ctx.model.encode_text(prep.tokens).float()).sum(-1)
        return maps, sim

    def process(self, ctx: RunContext, prep: Prepared) -> tuple[list[dict], dict]:
        rnd, b = self.randomiser(ctx), prep.batch
        valid = None if ctx.explainer.modality == "image" else prep.tokens.content_mask
        orig, sim_orig = self._maps(ctx, prep)
        base = {"sim_orig": sim_orig, **complexity_columns(orig, valid=valid)}
        base = {k: v.double().cpu().tolist() for k, v in base.items()}
        labels = b.labels.tolist()
        states = self.states(rnd.n_layers)
        per_state, flags = [], []
        for _, chosen in states:
            with rnd.randomised(chosen):
                maps, sim = self._maps(ctx, prep)
            scores = ctx.metrics(orig, maps, valid)
            flags.append(scores.pop("map_flag"))
            per_state.append({**scores, "sim_rand": sim, **complexity_columns(maps, "rand", valid=valid)})
        # one host transfer for every state: (S, B) per column
        cols = {k: torch.stack([st[k].double() for st in per_state]).cpu().tolist() for k in per_state[0]}
        rows = []
        for s, (mode, chosen) in enumerate(states):
            last = chosen[-1] if chosen else None  # states list their units output-first
            block = self.block_column(last, rnd.n_layers)
            rows += [
                {**ctx.ids, "study": self.name, "sample_id": sid, "caption": cap, "label": labels[i],
                 "tower": rnd.tower_name, "randomisation": mode, "block": block, "unit": unit_label(last),
                 "n_randomised": len(chosen),
                 **{k: v[i] for k, v in base.items()}, **{k: v[s][i] for k, v in cols.items()}, "map_flag": flags[s][i]}
                for i, (sid, cap) in enumerate(zip(b.sample_ids, b.captions))
            ]
        k = ctx.examples_left
        if k <= 0 or valid is not None:
            return rows, {}
        return rows, {"sample_id": np.array(b.sample_ids[:k]), "caption": np.array(b.captions[:k]),
                      "image": to_uint8_images(prep.pixels[:k]), "map_clean": orig[:k].half().cpu().numpy()}

    def extra_summary(self, ctx: RunContext) -> dict:
        """Mean similarity per (mode, block), the curve of Adebayo et al.'s figure, from every row written."""
        path = ctx.run_dir / RESULTS_FILE
        curves: dict = {}
        if path.exists():
            f = pd.read_parquet(path, columns=["randomisation", "unit", *RAND_METRICS])
            for (mode, unit), g in f.groupby(["randomisation", "unit"], sort=False):
                curves.setdefault(mode, {})[unit] = {m: float(g[m].mean()) for m in RAND_METRICS}
        return {"randomisation": {"tower": self.tower_of(ctx), "modes": self.modes, "scope": self.scope,
                                  "seed": ctx.seed,
                                  "rule": "N(mean(w), std(w)^2) per parameter tensor", "curves": curves}}


__all__ = ["MODES", "RandomisationStudy"]
