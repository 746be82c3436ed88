"""Model randomisation: seeded, reversible re-initialisation of head, blocks and stem on every backend; the
study's sanity rows."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from clip_xai.__main__ import run
from clip_xai.models.randomise import HEAD, STEM, TowerRandomiser, cascading_states, independent_states, units
from clip_xai.schema import RANDOMISATION_COLUMNS, RUN_COLUMNS
from tests.helpers import compose_cfg, run_cli


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_states():
    """Default: output head first, blocks top down, stem last (Adebayo 2018 / Quantus MPRT order)."""
    assert units(3) == [HEAD, 2, 1, 0, STEM]
    assert cascading_states(2) == [(), (HEAD,), (HEAD, 1), (HEAD, 1, 0), (HEAD, 1, 0, STEM)]
    assert independent_states(2) == [(HEAD,), (1,), (0,), (STEM,)]
    assert cascading_states(3, scope="blocks") == [(), (2,), (2, 1), (2, 1, 0)]
    assert cascading_states(2, include_none=False, scope="blocks") == [(1,), (1, 0)]
    assert independent_states(3, scope="blocks") == [(2,), (1,), (0,)]


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_head_blocks_and_stem_cover_every_weight_the_embedding_uses(any_model, tower):
    """Every parameter that gets a gradient from the tower's embedding is in exactly one unit, the
    head holds the final norm (ln_post / ln_final / post_layernorm ...) and the stem the embeddings."""
    model = any_model
    r = TowerRandomiser(model, tower)
    per_unit = {u: {id(p) for p in r.parameters(u)} for u in units(r.n_layers)}
    assert per_unit[HEAD] and per_unit[STEM]
    ids = [i for ps in per_unit.values() for i in ps]
    assert len(ids) == len(set(ids))  # no tensor in two units
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        if tower == "vision":
            emb = model.encode_image(torch.rand(1, 3, model.image_size, model.image_size))
        else:
            emb = model.encode_text(model.tokenize(["a photo of a dog"]))
        (emb * torch.randn_like(emb)).sum().backward()
        used = {id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    finally:
        for p, f in zip(model.parameters(), flags):
            p.grad = None
            p.requires_grad_(f)
    assert len(used) > 10
    assert used <= set(ids), "weights the embedding uses that no unit randomises"


@pytest.mark.parametrize("unit", [HEAD, STEM])
def test_head_and_stem_restore_bit_for_bit(any_model, unit):
    before = _state(any_model)
    r = TowerRandomiser(any_model, "vision", seed=3)
    params = r.parameters(unit)
    originals = [p.detach().clone() for p in params]
    with r.randomised([unit, 0]):
        moved = [not torch.equal(p, o) for p, o in zip(params, originals)]
    after = _state(any_model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise restored
    assert sum(moved) >= sum(bool(o.float().std() > 0) for o in originals if o.numel() > 1) > 0


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_randomise_restores_and_is_seeded(any_model, tower):
    model = any_model
    before = _state(model)
    r = TowerRandomiser(model, tower, seed=5)
    last = r.n_layers - 1
    params = r.parameters(last)
    originals = [p.detach().clone() for p in params]
    with r.randomised([last]):
        inside = [p.detach().clone() for p in params]
        # only the chosen block moved
        other = TowerRandomiser(model, tower, seed=5).parameters(0)
        assert all(torch.equal(p, q) for p, q in zip(other, r.parameters(0)))
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise restored
    # inside, every tensor that was not constant held other values
    moved = [not torch.equal(a, o) for a, o in zip(inside, originals)]
    varying = [p.detach().float().std() > 0 for p in params if p.numel() > 1]
    assert sum(moved) >= sum(bool(v) for v in varying) > 0
    # same seed -> same draws; other seed or other block -> other draws; moments kept
    again = TowerRandomiser(model, tower, seed=5).random_weights(last)
    assert all(torch.equal(a, b) for a, b in zip(again, r.random_weights(last)))
    other_seed = TowerRandomiser(model, tower, seed=6).random_weights(last)
    big = max(range(len(params)), key=lambda i: params[i].numel())
    assert not torch.equal(other_seed[big], again[big])
    w, new = params[big].detach().double(), again[big].double()
    assert new.mean().item() == pytest.approx(w.mean().item(), abs=4 * w.std().item() / w.numel() ** 0.5)
    assert new.std().item() == pytest.approx(w.std().item(), rel=0.05)


def test_randomise_restores_on_error(tiny):
    before = _state(tiny)
    r = TowerRandomiser(tiny, "vision", seed=0)
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
    df = _run(tmp_path, "explainer=saliency", "study.modes=[cascading]", "study.scope=blocks")
    assert list(df.columns) == RANDOMISATION_COLUMNS + RUN_COLUMNS
    assert len(df) == 13 and set(df["tower"]) == {"vision"}
    none = df[df["randomisation"] == "none"]
    assert (none[["rand_spearman", "rand_ssim", "rand_topk"]] == 1.0).all().all()  # nothing randomised
    np.testing.assert_allclose(none["sim_rand"], none["sim_orig"], atol=1e-6)
    full = df[(df["randomisation"] == "cascading") & (df["n_randomised"] == 12)]
    assert len(full) == 1 and (full["block"] == 0).all() and (full["unit"] == "b0").all()
    assert (full["rand_spearman"] < 0.9).all() and (full["rand_ssim"] < 0.9).all()  # the map depends on the weights
    cascade = df[df["randomisation"] == "cascading"].sort_values("n_randomised")
    assert cascade["n_randomised"].tolist() == [*range(1, 13)]
    assert (df["map_flag"] == "").all()


def test_default_cascade_runs_from_the_head_to_the_stem(tmp_path):
    """The default scope: 14 cascading states (head, 12 blocks, stem), in that order; the blocks-only
    states of the default give the same rows as scope=blocks (the block draws do not depend on it)."""
    df = _run(tmp_path / "model", "explainer=saliency", "study.modes=[cascading]")
    cascade = df[df["randomisation"] == "cascading"].sort_values("n_randomised")
    assert cascade["unit"].tolist() == ["head", *(f"b{i}" for i in range(11, -1, -1)), "stem"]
    assert cascade["block"].tolist() == [12, *range(11, -1, -1), -2]
    blocks = _run(tmp_path / "blocks", "explainer=saliency", "study.modes=[independent]", "study.scope=blocks")
    assert blocks["unit"].tolist() == ["none", *(f"b{i}" for i in range(11, -1, -1))]
    indep = _run(tmp_path / "indep", "explainer=saliency", "study.modes=[independent]")
    same = indep[indep["unit"].isin(blocks["unit"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(same[["unit", "rand_spearman", "sim_rand"]],
                                  blocks[["unit", "rand_spearman", "sim_rand"]])


def test_sanity_rows_text(tmp_path):
    df = _run(tmp_path, "explainer=saliency", "explainer.modality=text", "study.modes=[independent]")
    assert set(df["tower"]) == {"text"} and len(df) == 15
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
    assert len(df) == 1 + 2 * 14 and set(df["randomisation"]) == {"none", "cascading", "independent"}
    summary = pd.read_json(path.parent / "summary.json", typ="series")
    curves = summary["randomisation"]["curves"]
    assert curves["none"]["none"]["rand_spearman"] == 1.0
    assert curves["cascading"]["stem"]["rand_spearman"] < 0.9 and curves["cascading"]["stem"]["rand_ssim"] < 0.9
