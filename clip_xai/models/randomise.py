"""Seeded re-initialisation of a tower's weights: the model-randomisation sanity check.

Adebayo et al. 2018 ("Sanity checks for saliency maps", NeurIPS) re-initialise a network's layers
from the output towards the input and ask whether the explanation changes: a map that survives
randomised weights does not explain the model. :class:`TowerRandomiser` does this for one tower of
any :class:`ClipAdapter`, through the adapter's public interface only, so it works on every
backend. A tower's *units*, in the order of the cascade (output to input, :func:`units`):

* ``"head"``: what follows the last block (final norm ``ln_post``/``ln_final``, an attentional
  pooler, the projection ``proj``), ``Tower.head_paths``;
* the blocks, top first: ``L-1, ..., 0`` (``tower.blocks[i].module``, the native block);
* ``"stem"``: what precedes block 0 (patch or token embedding ``conv1``, class and position
  embeddings, ``ln_pre``), ``Tower.stem_paths``.

``scope="model"`` (the default) uses all of them, the order of Adebayo et al. (2018) and of
Quantus' MPRT (``ln_post`` first, ``conv1`` last); ``scope="blocks"`` the blocks only (what this
module did before the head and stem were added). The states are the *cascading* ones (units
randomised from the output down, one more per state, :func:`cascading_states`) and the
*independent* ones (one unit at a time, :func:`independent_states`).

Re-initialisation rule, the same for every backend and unit: each parameter tensor is re-drawn
from a Gaussian with that tensor's own mean and standard deviation, ``N(mean(w), std(w)²)``. That
keeps each tensor's scale (activations stay in range, as with the layer's initialiser) while
destroying what was learnt; tensors whose values are all equal (std 0: LayerNorm gains of a
freshly initialised model, zero biases, a single scalar) are left as they are, which is what
their initialiser would give. Draws come from a CPU ``torch.Generator`` seeded per (seed, tower,
unit), so the randomised weights are identical on every device, for every batch and in both
kinds of state (cascading state k holds exactly the independent draws of its k units), and a
block's draws do not depend on the scope. They are drawn once and kept on the model's device
(one extra copy of the tower's weights).

:meth:`TowerRandomiser.randomised` is a context manager: it copies the originals, writes the
random weights in place, and copies the originals back on exit, also on error, so no state
leaks into later forwards (bit for bit: the saved copies are written back).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import Tensor

from clip_xai.errors import ClipXaiError
from clip_xai.seeds import sample_seed

TOWERS = ("vision", "text")
HEAD, STEM = "head", "stem"
SCOPES = ("model", "blocks")
Unit = int | str  # a block index, HEAD or STEM

__all__ = ["HEAD", "SCOPES", "STEM", "TOWERS", "TowerRandomiser", "Unit", "cascading_states", "independent_states",
           "unit_label", "units"]


def units(n_layers: int, scope: str = "model") -> list[Unit]:
    """The tower's units in cascade order, output to input: ``[head, L-1, ..., 0, stem]`` for
    ``scope="model"``, ``[L-1, ..., 0]`` for ``scope="blocks"``."""
    if scope not in SCOPES:
        raise ClipXaiError(f"unknown randomisation scope {scope!r}", f"use one of {', '.join(SCOPES)}")
    top_down: list[Unit] = list(range(n_layers - 1, -1, -1))
    return [HEAD, *top_down, STEM] if scope == "model" else top_down


def cascading_states(n_layers: int, include_none: bool = True, scope: str = "model") -> list[tuple[Unit, ...]]:
    """``[(), (u1,), (u1, u2), ...]`` over :func:`units`: randomised from the output down."""
    order = units(n_layers, scope)
    states = [tuple(order[:k]) for k in range(1, len(order) + 1)]
    return [()] + states if include_none else states


def independent_states(n_layers: int, scope: str = "model") -> list[tuple[Unit, ...]]:
    """``[(u1,), (u2,), ...]`` over :func:`units`: one unit at a time, output first."""
    return [(u,) for u in units(n_layers, scope)]


def unit_label(unit: Unit | None) -> str:
    """``"none"``, ``"head"``, ``"stem"`` or ``"b<i>"``: the results' ``unit`` column."""
    return "none" if unit is None else unit if isinstance(unit, str) else f"b{int(unit)}"


class TowerRandomiser:
    """Seeded, reversible re-initialisation of the units of ``model.<tower>`` (see module docstring)."""

    def __init__(self, model, tower: str = "vision", seed: int = 0):
        if tower not in TOWERS:
            raise ClipXaiError(f"unknown tower {tower!r} to randomise", f"use one of {', '.join(TOWERS)}")
        self.model = model
        self.tower_name = tower
        self.tower = getattr(model, tower)
        self.seed = int(seed)
        self._random: dict[Unit, list[Tensor]] = {}

    @property
    def n_layers(self) -> int:
        return self.tower.n_layers

    def _key(self, unit: Unit) -> Unit:
        if isinstance(unit, str):
            if unit not in (HEAD, STEM):
                raise ClipXaiError(f"unknown unit {unit!r} to randomise", "use a block index, 'head' or 'stem'")
            return unit
        return self.tower.layer(unit)

    def unit_seed(self, unit: Unit) -> int:
        """The seed of a unit's draws (stable across runs, devices and batches; a block's seed is
        the one it had before head and stem existed)."""
        return sample_seed(self.seed, f"randomise/{self.tower_name}/{self._key(unit)}")

    def parameters(self, unit: Unit) -> list[torch.nn.Parameter]:
        """The unit's parameters: a block's in ``named_parameters`` order, the head's and stem's in
        path order (shared tensors once)."""
        key = self._key(unit)
        if isinstance(key, str):
            return self.tower.part_parameters(key)
        return list(self.tower.blocks[key].module.parameters())

    def random_weights(self, unit: Unit) -> list[Tensor]:
        """The unit's re-drawn tensors (drawn on first use, then kept on the parameters' device)."""
        key = self._key(unit)
        if key not in self._random:
            gen = torch.Generator().manual_seed(self.unit_seed(key))
            out = []
            for p in self.parameters(key):
                w = p.detach().to("cpu", torch.float64)
                mean = w.mean()
                std = w.std() if w.numel() > 1 else torch.zeros((), dtype=torch.float64)
                noise = torch.randn(w.shape, generator=gen, dtype=torch.float64)
                new = mean + std * noise if std > 0 else w.clone()
                out.append(new.to(device=p.device, dtype=p.dtype))
            self._random[key] = out
        return self._random[key]

    @contextlib.contextmanager
    def randomised(self, chosen: Iterable[Unit]) -> Iterator[None]:
        """Within the block, units ``chosen`` hold their random weights; the originals come back on exit."""
        keys = list(dict.fromkeys(self._key(u) for u in chosen))
        saved: list[tuple[Tensor, Tensor]] = []
        seen: set[int] = set()
        try:
            with torch.no_grad():
                for key in keys:
                    for p, r in zip(self.parameters(key), self.random_weights(key)):
                        if id(p) in seen:
                            continue
                        seen.add(id(p))
                        saved.append((p, p.detach().clone()))
                        p.copy_(r)
            yield
        finally:
            with torch.no_grad():
                for p, original in reversed(saved):
                    p.copy_(original)
