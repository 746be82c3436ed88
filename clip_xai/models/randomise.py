"""Seeded re-initialisation of a tower's blocks: the model-randomisation sanity check.

Adebayo et al. 2018 ("Sanity checks for saliency maps", NeurIPS) re-initialise a network's layers
and ask whether the explanation changes: a map that survives randomised weights does not explain
the model. :class:`BlockRandomiser` does this for one tower of any :class:`ClipAdapter`, through
the adapter's public interface only (``tower.blocks[i].module`` = the native block), so it works
on every backend. Its states are the *cascading* ones (blocks randomised from the top down,
:func:`cascading_states`) and the *independent* ones (one block at a time,
:func:`independent_states`).

Re-initialisation rule, the same for every backend: each parameter tensor of a block is re-drawn
from a Gaussian with that tensor's own mean and standard deviation, ``N(mean(w), std(w)²)``. That
keeps each tensor's scale (activations stay in range, as with the layer's initialiser) while
destroying what was learnt; tensors whose values are all equal (std 0: LayerNorm gains of a
freshly initialised model, zero biases, a single scalar) are left as they are, which is what
their initialiser would give. Draws come from a CPU ``torch.Generator`` seeded per (seed, tower,
block), so the randomised weights are identical on every device, for every batch and in both
kinds of state (cascading state k holds exactly the independent draws of its k blocks). They are
drawn once and kept on the model's device (one extra copy of the tower's blocks).

:meth:`BlockRandomiser.randomised` is a context manager: it copies the originals, writes the
random weights in place, and copies the originals back on exit, also on error, so no state
leaks into later forwards.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import Tensor

from clip_xai.config import sample_seed
from clip_xai.errors import ClipXaiError

TOWERS = ("vision", "text")

__all__ = ["TOWERS", "BlockRandomiser", "cascading_states", "independent_states"]


def cascading_states(n_layers: int, include_none: bool = True) -> list[tuple[int, ...]]:
    """``[(), (L-1,), (L-1, L-2), ..., (L-1, ..., 0)]``: blocks randomised from the top down."""
    top_down = list(range(n_layers - 1, -1, -1))
    states = [tuple(top_down[:k]) for k in range(1, n_layers + 1)]
    return [()] + states if include_none else states


def independent_states(n_layers: int) -> list[tuple[int, ...]]:
    """``[(L-1,), (L-2,), ..., (0,)]``: one block at a time, top first."""
    return [(i,) for i in range(n_layers - 1, -1, -1)]


class BlockRandomiser:
    """Seeded, reversible re-initialisation of the blocks of ``model.<tower>`` (see module docstring)."""

    def __init__(self, model, tower: str = "vision", seed: int = 0):
        if tower not in TOWERS:
            raise ClipXaiError(f"unknown tower {tower!r} to randomise", f"use one of {', '.join(TOWERS)}")
        self.model = model
        self.tower_name = tower
        self.tower = getattr(model, tower)
        self.seed = int(seed)
        self._random: dict[int, list[Tensor]] = {}

    @property
    def n_layers(self) -> int:
        return self.tower.n_layers

    def block_seed(self, index: int) -> int:
        """The seed of block ``index``'s draws (stable across runs, devices and batches)."""
        return sample_seed(self.seed, f"randomise/{self.tower_name}/{index}")

    def parameters(self, index: int) -> list[torch.nn.Parameter]:
        """The block's parameters, in ``named_parameters`` order (shared tensors once)."""
        return list(self.tower.blocks[self.tower.layer(index)].module.parameters())

    def random_weights(self, index: int) -> list[Tensor]:
        """The block's re-drawn tensors (drawn on first use, then kept on the parameters' device)."""
        i = self.tower.layer(index)
        if i not in self._random:
            gen = torch.Generator().manual_seed(self.block_seed(i))
            out = []
            for p in self.parameters(i):
                w = p.detach().to("cpu", torch.float64)
                mean = w.mean()
                std = w.std() if w.numel() > 1 else torch.zeros((), dtype=torch.float64)
                noise = torch.randn(w.shape, generator=gen, dtype=torch.float64)
                new = mean + std * noise if std > 0 else w.clone()
                out.append(new.to(device=p.device, dtype=p.dtype))
            self._random[i] = out
        return self._random[i]

    @contextlib.contextmanager
    def randomised(self, blocks: Iterable[int]) -> Iterator[None]:
        """Within the block, blocks ``blocks`` hold their random weights; the originals come back on exit."""
        indices = sorted({self.tower.layer(b) for b in blocks})
        saved: list[tuple[Tensor, Tensor]] = []
        try:
            with torch.no_grad():
                for i in indices:
                    for p, r in zip(self.parameters(i), self.random_weights(i)):
                        saved.append((p, p.detach().clone()))
                        p.copy_(r)
            yield
        finally:
            with torch.no_grad():
                for p, original in reversed(saved):
                    p.copy_(original)
