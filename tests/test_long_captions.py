"""Captions longer than the text context: flagged and skipped, truncated, or an error (dataset.on_long_caption)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from clip_xai.data.captions import TOO_LONG, TRUNCATED, fit_captions, truncate_caption
from clip_xai.errors import ClipXaiError
from clip_xai.types import Batch

LONG = " ".join(f"word{i}" for i in range(200))


def _batch(captions: list[str]) -> Batch:
    n = len(captions)
    return Batch([f"s{i}" for i in range(n)], torch.rand(n, 3, 8, 8), list(captions), torch.arange(n),
                 torch.zeros(n, 8, 8, dtype=torch.bool))


def test_skip_removes_only_the_long_caption(any_model):
    b = _batch(["a photo of a cat", LONG, "a dog"])
    fitted = fit_captions(any_model, b, "skip")
    assert fitted.too_long == ["s1"] and fitted.truncated == set()
    kept = fitted.batch
    assert kept.sample_ids == ["s0", "s2"] and kept.captions == ["a photo of a cat", "a dog"]
    assert torch.equal(kept.pixels, b.pixels[[0, 2]]) and kept.labels.tolist() == [0, 2]
    assert kept.object_masks.shape[0] == 2
    assert fit_captions(any_model, _batch(["a cat"]), "error").batch.captions == ["a cat"]  # fits: untouched


def test_truncate_keeps_the_longest_whole_word_prefix_and_the_end_token(any_model):
    fitted = fit_captions(any_model, _batch(["a photo of a cat", LONG]), "truncate")
    short = fitted.batch.captions[1]
    assert fitted.truncated == {"s1"} and fitted.too_long == []
    words = LONG.split()
    k = len(short.split())
    assert short == " ".join(words[:k]) and 0 < k < len(words)
    n = any_model.token_lengths([short])[0]
    assert n <= any_model.context_length < any_model.token_lengths([" ".join(words[: k + 1])])[0]  # maximal
    tokens = any_model.tokenize(fitted.batch.captions)  # no error now
    last = tokens.attention_mask[1].sum() - 1  # position of the last real token
    assert last == n - 1
    end_id = tokens.ids[1, last]
    assert end_id == tokens.ids[0, tokens.attention_mask[0].sum() - 1]  # the same end-of-text token as a short caption
    # one over-long "word": cut by characters
    giant = truncate_caption(any_model, "x" * 2000)
    assert giant and set(giant) == {"x"} and any_model.token_lengths([giant])[0] <= any_model.context_length


def test_error_names_the_sample_and_the_setting(tiny):
    with pytest.raises(ClipXaiError, match=r"(?s)sample s1 .*dataset.on_long_caption"):
        fit_captions(tiny, _batch(["a cat", LONG]), "error")


def _run(tmp_path, overrides):
    from clip_xai.__main__ import run
    from tests.helpers import compose_cfg

    cfg = compose_cfg(["model=tiny", "logger=none", f"output_root={tmp_path}", "explainer=selfattn", *overrides])
    return run(cfg, tmp_path / "run", None, "test")


@pytest.fixture()
def cc_with_long_caption(tmp_path):
    from PIL import Image

    root = tmp_path / "cc"
    root.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (64, 48), color).save(root / f"{i}.jpg")
    (root / "list.csv").write_text(f"image_path,caption\n0.jpg,a red square\n1.jpg,{LONG}\n")
    return root / "list.csv"


def test_study_flags_long_caption_and_goes_on(tmp_path, cc_with_long_caption):
    summary = _run(tmp_path / "skip", ["dataset=cc", f"dataset.root={cc_with_long_caption}"])
    rows = pd.read_parquet(tmp_path / "skip" / "run" / "results.parquet")
    assert summary["counts"]["long_captions"] == 1 and summary["counts"]["rows"] == 2
    assert summary["counts"]["flagged_maps"] == 0  # not counted as a bad map
    flagged = rows[rows["map_flag"] == TOO_LONG]
    assert flagged["sample_id"].tolist() == ["1.jpg"] and flagged["spearman"].isna().all()
    assert flagged["caption"].iloc[0] == LONG
    assert rows.loc[rows["map_flag"] != TOO_LONG, "spearman"].notna().all()

    summary = _run(tmp_path / "trunc", ["dataset=cc", f"dataset.root={cc_with_long_caption}",
                                        "dataset.on_long_caption=truncate"])
    rows = pd.read_parquet(tmp_path / "trunc" / "run" / "results.parquet").set_index("sample_id")
    assert summary["counts"]["truncated_captions"] == 1 and summary["counts"]["long_captions"] == 0
    assert rows.loc["1.jpg", "caption_flag"] == TRUNCATED and rows.loc["0.jpg", "caption_flag"] == ""
    assert LONG.startswith(rows.loc["1.jpg", "caption"]) and rows.loc["1.jpg", "caption"] != LONG
    assert pd.notna(rows.loc["1.jpg", "spearman"])


def test_unknown_policy_is_refused_at_start_up(tmp_path):
    with pytest.raises(ClipXaiError, match="must be one of"):
        _run(tmp_path, ["dataset.on_long_caption=cut"])
    assert not (tmp_path / "run" / "results.parquet").exists()


def test_results_written_before_caption_flag_still_load_in_the_report(tmp_path):
    from clip_xai.report.collect import load_run
    from clip_xai.schema import SENSITIVITY_COLUMNS

    old = {c: [0.0] for c in SENSITIVITY_COLUMNS if c != "caption_flag"}
    old.update(sample_id=["a"], caption=["a cat"], study=["sensitivity"], map_flag=[""])
    (tmp_path / "run").mkdir()
    pd.DataFrame(old).to_parquet(tmp_path / "run" / "results.parquet")
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")
    df = load_run(tmp_path / "run")
    assert df["caption_flag"].tolist() == [""]
