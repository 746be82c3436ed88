"""Per-sample flags for unusable maps (constant, or holding NaN/inf) in a clean/perturbed pair."""

from __future__ import annotations

import torch
from torch import Tensor

from ._util import flatten_pair, nonfinite_rows

__all__ = ["FLAG_BITS", "unusable_rows", "map_flag_codes", "decode_flags", "map_flags"]

# Bit -> name. A map with a NaN or inf gets only its "nan_*" flag (its constancy is moot).
FLAG_BITS: dict[int, str] = {
    1: "nan_clean",
    2: "constant_clean",
    4: "nan_pert",
    8: "constant_pert",
}


def unusable_rows(m: Tensor) -> tuple[Tensor, Tensor]:
    """(B, N) maps -> two (B,) bools: ``nonfinite`` (a NaN or ±inf) and ``constant`` (every value
    equal, exact; only where finite). The one rule behind every suite's "nan_*"/"constant_*" flags."""
    bad = nonfinite_rows(m)
    return bad, (m.amax(dim=1) == m.amin(dim=1)) & ~bad


def map_flag_codes(clean: Tensor, pert: Tensor) -> Tensor:
    """(B,) int64 bitmask of ``FLAG_BITS`` on the input device; 0 when both maps are usable.

    "nan_*" = the map holds a NaN or ±inf; "constant_*" = every value equal (max == min, exact).
    """
    x, y = flatten_pair(clean, pert)
    code = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    for m, nan_bit, const_bit in ((x, 1, 2), (y, 4, 8)):
        bad, const = unusable_rows(m)
        code |= bad.to(torch.int64) * nan_bit
        code |= const.to(torch.int64) * const_bit
    return code


def decode_flags(codes: Tensor) -> list[str]:
    """Bitmask codes -> strings: "" or names joined with "+", e.g. "constant_clean+constant_pert"."""
    out = []
    for c in codes.reshape(-1).tolist():  # one host transfer, then plain ints
        out.append("+".join(name for bit, name in FLAG_BITS.items() if c & bit))
    return out


def map_flags(clean: Tensor, pert: Tensor) -> list[str]:
    """Per-sample flag strings: "" if both maps are usable, else e.g. "nan_pert", "constant_clean"."""
    return decode_flags(map_flag_codes(clean, pert))
