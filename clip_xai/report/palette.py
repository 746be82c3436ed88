"""One colour per method across every figure of a report, methods of one family in neighbouring hues.

The families are defined here once (explainer name -> family); a method label such as
``abm[target_layer=8]`` or ``gradcam[modality=text]`` belongs to its explainer's family. Hues go
round the colour wheel family by family, with a gap between families, so methods of one family sit
side by side and two families never share a hue; lightness alternates within a family so
neighbours stay apart. The palette depends only on the set of methods in the report, so every
figure that draws a method draws it in the same colour.
"""
from __future__ import annotations

from typing import Iterable

from seaborn.external import husl

#: Family -> explainer names (the names of conf/explainer/*.yaml). Unknown names fall in "other".
FAMILIES: dict[str, list[str]] = {
    "gradient": ["saliency", "saliency_nib", "fastig", "fastig_nib", "mfaba", "mfaba_nib"],
    "cam": ["gradcam", "eclip", "legrad"],
    "attention": ["selfattn", "rollout", "chefer", "game", "attnlrp"],
    "dense": ["maskclip", "surgery", "surgery_demo", "gem"],
    "perturbation": ["rise", "rise_nib", "m2ib", "abm"],
    "interaction": ["interactions"],
}
FAMILY_OF = {name: fam for fam, names in FAMILIES.items() for name in names}
ORDER = [*FAMILIES, "other"]
LIGHTNESS = (55.0, 70.0, 42.0)  # alternated within a family (HUSL lightness, 0-100)
SATURATION = 90.0


def explainer_of(method: str) -> str:
    """The explainer name of a method label: ``model | abm[steps=5]`` -> ``abm``."""
    return method.split(" | ")[-1].split("[")[0].strip()


def family(method: str) -> str:
    """The family of a method label ("other" for an explainer not in :data:`FAMILIES`)."""
    return FAMILY_OF.get(explainer_of(method), "other")


def ordered(methods: Iterable[str]) -> list[str]:
    """Methods sorted by family (in :data:`ORDER`), then by name: the order of legends and colours."""
    return sorted(set(methods), key=lambda m: (ORDER.index(family(m)), m))


def palette(methods: Iterable[str]) -> dict[str, tuple[float, float, float]]:
    """Method -> RGB colour: families on consecutive stretches of the hue wheel, a one-step gap
    between families, lightness alternating within a family."""
    ms = ordered(methods)
    if not ms:
        return {}
    slots, pos, prev = [], 0, None
    for m in ms:
        if prev is not None and family(m) != prev:
            pos += 1  # a gap between families
        slots.append(pos)
        pos += 1
        prev = family(m)
    total = pos + 1  # also a gap between the last family and the first (the wheel closes)
    out, k = {}, 0
    for i, (m, slot) in enumerate(zip(ms, slots)):
        k = 0 if i == 0 or family(m) != family(ms[i - 1]) else k + 1
        rgb = husl.husl_to_rgb(360.0 * slot / total, SATURATION, LIGHTNESS[k % len(LIGHTNESS)])
        out[m] = tuple(min(1.0, max(0.0, float(c))) for c in rgb)
    return out
