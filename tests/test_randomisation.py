"""Model randomisation: seeded, reversible block re-initialisation on every backend; the study's sanity rows."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from clip_xai.__main__ import run
from clip_xai.models.randomise import BlockRandomiser, cascading_states, independent_states
from clip_xai.schema import RANDOMISATION_COLUMNS
from tests.helpers import compose_cfg, run_cli


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_states():
    assert cascading_states(3) == [(), (2,), (2, 1), (2, 1, 0)]
    assert cascading_states(2, include_none=False) == [(1,), (1, 0)]
    assert independent_states(3) == [(2,), (1,), (0,)]


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_randomise_restores_and_is_seeded(any_model, tower):
    model = any_model
    before = _state(model)
    r = BlockRandomiser(model, tower, seed=5)
    last = r.n_layers - 1
    params = r.parameters(last)
    originals = [p.detach().clone() for p in params]
    with r.randomised([last]):
        inside = [p.detach().clone() for p in params]
        # only the chosen block moved
        other = BlockRandomiser(model, tower, seed=5).parameters(0)
        assert all(torch.equal(p, q) for p, q in zip(other, r.parameters(0)))
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise restored
    # inside, every tensor that was not constant held other values
    moved = [not torch.equal(a, o) for a, o in zip(inside, originals)]
    varying = [p.detach().float().std() > 0 for p in params if p.numel() > 1]
    assert sum(moved) >= sum(bool(v) for v in varying) > 0
    # same seed -> same draws; other seed or other block -> other draws; moments kept
    again = BlockRandomiser(model, tower, seed=5).random_weights(last)
    assert all(torch.equal(a, b) for a, b in zip(again, r.random_weights(last)))
    other_seed = BlockRandomiser(model, tower, seed=6).random_weights(last)
    big = max(range(len(params)), key=lambda i: params[i].numel())
    assert not torch.equal(other_seed[big], again[big])
    w, new = params[big].detach().double(), again[big].double()
    assert new.mean().item() == pytest.approx(w.mean().item(), abs=4 * w.std().item() / w.numel() ** 0.5)
    assert new.std().item() == pytest.approx(w.std().item(), rel=0.05)


def test_randomise_restores_on_error(tiny):
    before = _state(tiny)
    r = BlockRandomiser(tiny, "vision", seed=0)
    with pytest.raises(RuntimeError, match="boom"):
        with r.randomised(range(r.n_layers)):
            raise RuntimeError("boom")
    after = _state(tiny)
    assert all(torch.equal(before[k], after[k]) for k in before)


def _run(tmp_path, *overrides: str) -> pd.DataFrame:
    cfg = compose_cfg(["model=tiny", "study=randomisation", "dataset=sample", "dataset.limit=1", "logger=none",
                       f"output_root={tmp_path}", "device=cpu", *overrides])
    run(cfg, tmp_path / "run", None, "test")
    return pd.read_parquet(tmp_path / "run" / "results.parquet")


def test_sanity_rows_image(tmp_path):
    df = _run(tmp_path, "explainer=saliency", "study.modes=[cascading]")
    assert list(df.columns) == RANDOMISATION_COLUMNS
    assert len(df) == 13 and set(df["tower"]) == {"vision"}
    none = df[df["randomisation"] == "none"]
    assert (none[["rand_spearman", "rand_ssim", "rand_topk"]] == 1.0).all().all()  # nothing randomised
    np.testing.assert_allclose(none["sim_rand"], none["sim_orig"], atol=1e-6)
    full = df[(df["randomisation"] == "cascading") & (df["n_randomised"] == 12)]
    assert len(full) == 1 and (full["block"] == 0).all()
    assert (full["rand_spearman"] < 0.9).all() and (full["rand_ssim"] < 0.9).all()  # the map depends on the weights
    cascade = df[df["randomisation"] == "cascading"].sort_values("n_randomised")
    assert cascade["n_randomised"].tolist() == [*range(1, 13)]
    assert (df["map_flag"] == "").all()


def test_sanity_rows_text(tmp_path):
    df = _run(tmp_path, "explainer=saliency", "explainer.modality=text", "study.modes=[independent]")
    assert set(df["tower"]) == {"text"} and len(df) == 13
    none = df[df["randomisation"] == "none"]
    assert (none["rand_spearman"] == 1.0).all() and none["rand_ssim"].isna().all()
    assert df["rand_topk"].notna().all() and df["sparseness_rand"].notna().all()
    assert (df.loc[df["randomisation"] == "independent", "rand_spearman"] < 1.0).any()


@pytest.mark.slow
def test_cli_randomisation(tmp_path):
    """The real entrypoint on the HF backend, with Grad-CAM (a second gradient method)."""
    res = run_cli(["model=altclip_tiny", "study=randomisation", "dataset=sample", "dataset.limit=1",
                   "explainer=gradcam", "logger=none", f"output_root={tmp_path}", "name=rnd"])
    assert res.returncode == 0, res.stderr[-3000:]
    (path,) = list((tmp_path / "rnd").rglob("results.parquet"))
    df = pd.read_parquet(path)
    assert len(df) == 1 + 2 * 12 and set(df["randomisation"]) == {"none", "cascading", "independent"}
    summary = pd.read_json(path.parent / "summary.json", typ="series")
    curves = summary["randomisation"]["curves"]
    assert curves["none"]["-1"]["rand_spearman"] == 1.0
    assert curves["cascading"]["0"]["rand_spearman"] < 0.9 and curves["cascading"]["0"]["rand_ssim"] < 0.9
