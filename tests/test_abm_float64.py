"""ABM ``float64=true``: the computation in float64 (equal to ABM on an explicit float64 copy of the
model), the model's weights restored bit for bit afterwards, and close to the float32 map."""
from __future__ import annotations

import copy

import torch

from clip_xai.explainers.abm import ABM


def test_float64_option(tiny):
    pixels = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tokens = tiny.tokenize(["a dog", "a red car"])
    seeds = torch.tensor([3, 4])
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    ours = ABM(steps=3, float64=True)(tiny, pixels, tokens, seeds)
    assert all(torch.equal(before[k], v) and before[k].dtype == v.dtype for k, v in tiny.state_dict().items())
    twin = copy.deepcopy(tiny).double()
    ref = ABM(steps=3)(twin, pixels.double(), twin.tokenize(["a dog", "a red car"]), seeds)
    assert torch.allclose(ours.double(), ref.double().float().double(), atol=0, rtol=0)
    f32 = ABM(steps=3)(tiny, pixels, tokens, seeds)
    r = torch.corrcoef(torch.stack([f32.flatten().double(), ours.flatten().double()]))[0, 1]
    assert r > 0.999
