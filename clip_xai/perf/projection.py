"""Before a long run: project its wall time from the bench numbers and print cheaper alternatives.

The rates are what ``make bench`` measured (docs/performance.md): on an H100 with ViT-B/16
(random weights) per precision, and on the 2-core build CPU with the tiny model. All were taken at
the yaml defaults (RISE 2,000 masks, 10 bottleneck or path steps). A run on another model scales by
the ratio of image-forward FLOPs (:func:`forward_flops`, from the tower's size). A run with other
settings scales linearly in ``n_masks`` or ``steps``. The result is a projection, good to a factor
of about two, and it is printed as one. Nothing here stops a run.
"""
from __future__ import annotations

import logging
import sys

import torch

from clip_xai.progress import fmt_seconds

log = logging.getLogger(__name__)

WARN_ABOVE_S = 300.0  # print the projection when a run would take longer than this

# images/s, best batch, yaml defaults; (device type, precision) -> (model, forward GFLOP, rates)
_CPU_TINY = {"abm": 6.57, "chefer": 155.01, "eclip": 169.36, "fastig": 71.57, "fgsm": 70.00, "game": 134.64,
             "gradcam": 155.96, "m2ib": 5.17, "maskclip": 171.19, "mfaba": 7.82, "rise": 0.110, "rollout": 222.40,
             "saliency": 69.01, "selfattn": 203.65, "surgery": 146.90,
             # legrad, gem: game's rate x their ratio to game timed side by side (tiny, batch 16, min
             # of 7 interleaved rounds, 2026-12-06, build CPU at load ~21-23: legrad 0.82 and 0.85,
             # gem 0.51); no H100 rates yet
             "legrad": 110.0, "gem": 69.0}
_H100_B16 = {
    "fp32": {"abm": 40.5, "chefer": 824.8, "eclip": 817.9, "fastig": 446.2, "fgsm": 445.7, "game": 825.4,
             "gradcam": 816.8, "m2ib": 29.9, "maskclip": 823.9, "mfaba": 49.0, "rise": 0.58, "rollout": 1067.2,
             "saliency": 446.3, "selfattn": 1070.5, "surgery": 821.5},
    "tf32": {"abm": 95.6, "chefer": 1011.6, "eclip": 1013.5, "fastig": 655.6, "fgsm": 682.9, "game": 1061.4,
             "gradcam": 968.4, "m2ib": 70.5, "maskclip": 1220.2, "mfaba": 104.9, "rise": 1.83, "rollout": 2792.8,
             "saliency": 772.8, "selfattn": 2863.3, "surgery": 1476.7},
    "bf16": {"abm": 215.5, "chefer": 3622.8, "eclip": 2542.0, "fastig": 1991.7, "fgsm": 1771.5, "game": 2504.9,
             "gradcam": 2812.2, "m2ib": 151.5, "maskclip": 2707.5, "mfaba": 245.9, "rise": 3.48, "rollout": 5296.6,
             "saliency": 1922.3, "selfattn": 5577.1, "surgery": 3346.9},
}
MEASURED = {
    ("cpu", "fp32"): ("tiny on the 2-core build CPU", _CPU_TINY),
    **{("cuda", p): (f"ViT-B/16 on one H100 in {p}", r) for p, r in _H100_B16.items()},
}
MEASURED_AT = {"n_masks": 2000, "steps": 10}  # the cost knobs' values when the rates were measured


def vit_forward_flops(n_layers: int, tokens: int, width: int) -> float:
    """FLOPs of one image forward through ``n_layers`` transformer blocks: per block 24·N·D²
    (q/k/v, output and the 4x MLP) + 4·N²·D (attention), for N tokens of width D."""
    return n_layers * (24 * tokens * width * width + 4 * tokens * tokens * width)


def forward_flops(model) -> float:
    """:func:`vit_forward_flops` of ``model``'s vision tower."""
    tower = model.vision
    return vit_forward_flops(tower.n_layers, model.n_prefix + model.grid[0] * model.grid[1], tower.width)


# The models the rates were measured on: tiny (12 blocks, width 64) and ViT-B/16 (12, 768), 197 tokens.
REFERENCE_FLOPS = {"cpu": vit_forward_flops(12, 197, 64), "cuda": vit_forward_flops(12, 197, 768)}


def rate_key(device: torch.device, precision: str) -> tuple[str, str] | None:
    """The measured rate table for ``precision`` on ``device``: fp16 and fp8 use the bf16 rates on
    CUDA (fp16 runs at bf16's speed; fp8 was not measured yet, so bf16 is its conservative
    estimate); a CPU precision that was not benched uses fp32's. None when nothing applies."""
    key = (device.type, "bf16" if precision in ("fp16", "bf16", "fp8") and device.type == "cuda" else precision)
    if key not in MEASURED and device.type == "cpu":
        key = ("cpu", "fp32")
    return key if key in MEASURED else None


def project_seconds(method: str, knobs: dict, model, device: torch.device, precision: str, samples: int,
                    maps_per_sample: int, steps_per_sample: int) -> tuple[float, str] | None:
    """(seconds, what the rate is based on) for ``samples`` samples, or None when nothing was measured.
    ``precision`` is the one the run uses (``precision=auto`` already resolved for the method)."""
    key = rate_key(device, precision)
    if key is None or method not in MEASURED[key][1]:
        return None
    basis, rates = MEASURED[key]
    ref_flops = REFERENCE_FLOPS[device.type]
    scale = forward_flops(model) / ref_flops
    for knob, measured_at in MEASURED_AT.items():
        if knob in knobs:
            scale *= float(knobs[knob]) / measured_at
    per_map = scale / rates[method]
    per_step = (forward_flops(model) / ref_flops) / rates["fgsm"]
    return samples * (maps_per_sample * per_map + steps_per_sample * per_step), basis


def alternatives(knobs: dict, device: torch.device, samples: int) -> list[str]:
    """Cheaper settings, each with how much it saves (cost is linear in each)."""
    out = []
    for knob in MEASURED_AT:
        if knob in knobs and int(knobs[knob]) >= 4:
            out.append(f"explainer.{knob}={int(knobs[knob]) // 4} (4x fewer, less accurate maps)")
    if samples >= 20:
        out.append(f"dataset.limit={samples // 10} (10x fewer samples)")
    if device.type == "cpu" and torch.cuda.is_available():
        out.append("device=cuda")
    if device.type == "cuda":
        out.append("precision=auto (per method, the cheapest precision whose maps agree with fp32 in the bench's "
                   "agreement table) or bf16 (or reference = fp16; see `make bench` for their agreement with fp32)")
    out.append("model=tiny (a random model: checks the pipeline in minutes, its maps mean nothing)")
    return out


def announce_if_long(method: str, knobs: dict, model, device: torch.device, precision: str, samples: int,
                     study: str, stream=None) -> float | None:
    """Print the projected wall time and cheaper alternatives when it exceeds ``WARN_ABOVE_S``."""
    maps, steps = (2, 1) if study == "sensitivity" else (1, 0)  # sensitivity: clean + perturbed map, FGSM
    got = project_seconds(method, knobs, model, device, precision, samples, maps, steps)
    if got is None:
        return None
    sec, basis = got
    if sec > WARN_ABOVE_S:
        lines = [f"note: this run is projected to take about {fmt_seconds(sec)} (h:mm:ss) for {samples} samples "
                 f"of {method} (from the bench rates of {basis}, scaled to this model and settings; "
                 f"a clean-map cache hit saves up to half). Cheaper alternatives:"]
        lines += [f"  - {alt}" for alt in alternatives(knobs, device, samples)]
        print("\n".join(lines), file=stream or sys.stderr, flush=True)
    return sec
