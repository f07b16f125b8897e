"""Attention sinks, value drains, residual peaks and the dormant test on tiny Llamas with planted heads."""
import json
import math
import random

import pytest
import torch

import weightlab as wl
from weightlab.inspect.heads import (HeadsConfig, _base_pass, analyze_heads, classify, domain_text, domain_windows,
                                     replay_loss)

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from _internals_tiny import WORDS, plant_sink, tiny_llama, word_tokenizer  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny tensors: one thread (conftest.py)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def text():
    rng = random.Random(0)
    return " ".join(rng.choice(WORDS) for _ in range(300))


@pytest.fixture(scope="module")
def sinky(tok):
    return plant_sink(tiny_llama(len(tok)))


def rows_by_head(rep):
    return {(r["layer"], r["head"]): r for r in rep.heads}


def test_planted_sink_is_flagged_and_dormant_uniform_head_is_not(sinky, tok, text):
    n = 24
    cfg = HeadsConfig(windows=3, seqlen=n, dormant_test="exact", tested="all")
    before = sinky.config._attn_implementation
    rep = analyze_heads(sinky, tok, cfg, texts={"x": text})
    assert sinky.config._attn_implementation == before != "eager"  # eager only for the call
    r = rows_by_head(rep)
    sink, uniform = r[(0, 0)], r[(0, 2)]
    assert sink["sink_mass"] > 0.999 and sink["row_entropy"] < 1e-3 and sink["sink"]
    # its output is already v_0 (= 0), so moving its attention to the first token changes nothing
    assert abs(sink["dloss"]) < 1e-6 and sink["state"] == "dormant"
    # v_0 = 0 in kv head 0, shared by heads 0 and 1
    assert sink["value_first"] == 0 and sink["drain_ratio"] == 0 and r[(0, 1)]["drain_ratio"] == 0
    # zero queries: every visible key gets 1/(q+1); queries 1..n-1 average to (H_n - 1)/(n - 1)
    harmonic = sum(1 / k for k in range(1, n + 1))
    assert uniform["sink_mass"] == pytest.approx((harmonic - 1) / (n - 1), abs=1e-6)
    assert uniform["row_entropy"] == pytest.approx(1.0, abs=1e-5)
    assert not uniform["sink"] and uniform["state"] == "active" and abs(uniform["dloss"]) > 1e-3
    assert rep.domains["x"]["sinks"] == 1 and rep.domains["x"]["dormant"] == 1 and rep.domains["x"]["rerun"] == 8
    # BOS carries the large hidden dim: its residual norm peaks over every other token
    assert all(lr["peak_ratio"] > 1.5 for lr in rep.layers)
    assert rep.grid("x", "sink_mass")[0][0] == sink["sink_mass"]
    json.dumps(rep.as_dict())


def test_sink_only_exact_test_reruns_just_the_sinks(sinky, tok, text):
    rep = analyze_heads(sinky, tok, HeadsConfig(windows=2, seqlen=16, dormant_test="exact"), texts={"x": text})
    r = rows_by_head(rep)
    assert rep.domains["x"]["rerun"] == 1 and r[(0, 0)]["state"] == "dormant" and r[(1, 0)]["dloss"] is None
    none = analyze_heads(sinky, tok, HeadsConfig(windows=2, seqlen=16, dormant_test="none"), texts={"x": text})
    assert rows_by_head(none)[(0, 0)]["state"] == "sink-untested" and rows_by_head(none)[(0, 0)]["dloss_linear"] is None


def test_replacement_equals_attention_forced_onto_the_first_token(tok, text, monkeypatch):
    """The v_0 shortcut against an independent route: eager attention whose probabilities for
    one head are overwritten with a one-hot row on key 0, run through the whole model."""
    import transformers.models.llama.modeling_llama as ml

    model = tiny_llama(len(tok), seed=3, head_std=0.3)
    ids = domain_windows(tok, text, 2, 20)
    stats, saved, base = _base_pass(model, ids)
    assert replay_loss(model, ids, saved, 0, None) == pytest.approx(base, abs=1e-6)  # a replay is the model
    assert replay_loss(model, ids, saved, 1, None) == pytest.approx(base, abs=1e-6)
    target = (1, 3)
    original = ml.eager_attention_forward

    def forced(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        out, w = original(module, query, key, value, attention_mask, scaling, dropout, **kw)
        if module.layer_idx != target[0]:
            return out, w
        w = w.clone()
        w[:, target[1]] = 0
        w[:, target[1], :, 0] = 1
        return torch.matmul(w, ml.repeat_kv(value, module.num_key_value_groups)).transpose(1, 2).contiguous(), w

    monkeypatch.setattr(ml, "eager_attention_forward", forced)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        logits = model(ids).logits
    ref = float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))
    monkeypatch.setattr(ml, "eager_attention_forward", original)
    got = replay_loss(model, ids, saved, *target)
    assert got == pytest.approx(ref, abs=1e-5) and abs(got - base) > 1e-3


def test_linear_estimate_tracks_exact_change_for_small_effects(sinky, tok, text):
    rep = analyze_heads(sinky, tok, HeadsConfig(windows=3, seqlen=24, dormant_test="exact", tested="all"),
                        texts={"x": text})
    for r in rep.heads:
        if (r["layer"], r["head"]) == (0, 2):
            continue  # scaled 20x on purpose: far outside the linear regime
        assert r["dloss_linear"] == pytest.approx(r["dloss"], rel=0.1, abs=2e-6)
    lin = analyze_heads(sinky, tok, HeadsConfig(windows=3, seqlen=24), texts={"x": text})
    assert lin.domains["x"]["dormant_test"] == "linear" and lin.domains["x"]["rerun"] == 0
    assert [r["dloss"] for r in lin.heads] == [r["dloss_linear"] for r in rep.heads]
    sinky.requires_grad_(False)  # a frozen model gets the same estimate
    try:
        frozen = analyze_heads(sinky, tok, HeadsConfig(windows=3, seqlen=24), texts={"x": text})
    finally:
        sinky.requires_grad_(True)
    assert [r["dloss"] for r in frozen.heads] == pytest.approx([r["dloss"] for r in lin.heads], abs=1e-9)
    assert all(p.grad is None for p in sinky.parameters())


def test_classify_thresholds():
    cfg = HeadsConfig()
    assert classify(0.49, 0.0, cfg) == "active"
    assert classify(0.9, 0.005, cfg) == "dormant" and classify(0.9, -0.009, cfg) == "dormant"
    assert classify(0.9, 0.02, cfg) == "active" and classify(0.9, None, cfg) == "sink-untested"
    assert classify(0.9, 0.02, HeadsConfig(dormant_threshold=0.05)) == "dormant"


def test_domain_windows_and_texts(tok, text):
    w = domain_windows(tok, text, 3, 10)
    body = tok(text, add_special_tokens=False)["input_ids"]
    assert w.shape == (3, 10) and bool((w[:, 0] == 0).all())
    assert w[0, 1:].tolist() == body[:9] and w[2, 1:].tolist() == body[-9:]
    assert domain_windows(tok, text, 1, 10, bos=False)[0].tolist() == body[:10]
    with pytest.raises(wl.ConfigError, match="fewer than one window"):
        domain_windows(tok, "dog cat", 1, 10)
    code = domain_text("code")
    assert "def " in code and "import" in code and len(code) > 100_000


def test_unsupported_model_is_a_clear_error(tok):
    with pytest.raises(wl.ConfigError, match="Llama-style"):
        analyze_heads(torch.nn.Linear(2, 2), tok, texts={"x": "dog"})


def test_heads_cli_report_and_json(sinky, tok, text, tmp_path):
    from weightlab.cli import main

    sinky.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text(" ".join(reversed(text.split())))
    args = ["heads", str(tmp_path / "m"), "--domains", f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}", "--seqlen", "16",
            "--test", "exact", "--report", str(tmp_path / "h.html"), "--json", str(tmp_path / "h.json")]
    assert main(args) == 0
    page = (tmp_path / "h.html").read_text()
    assert page.startswith("<!doctype html>") and "L0" in page and "dormant" in page
    data = json.loads((tmp_path / "h.json").read_text())
    assert len(data["heads"]) == 16 and {d["sinks"] for d in data["domains"].values()} == {1}
    assert all(math.isfinite(d["loss"]) for d in data["domains"].values())
    assert main(["heads", str(tmp_path / "m"), "--test", "maybe"]) == 1
    assert main(["heads", str(tmp_path / "m"), "--domains", str(tmp_path / "nope.txt")]) == 1


def test_heads_and_neurons_join_the_inspect_report(sinky, tok, text, tmp_path):
    from weightlab.inspect.internals_html import attach
    from weightlab.inspect.neurons import NeuronsConfig, decode_neurons

    res = wl.inspect.analyze(sinky)
    plain = res.write_html(tmp_path / "plain.html").read_text()
    assert "wl-heads" not in plain and "wl-neurons" not in plain  # only when asked
    rep = analyze_heads(sinky, tok, HeadsConfig(windows=1, seqlen=16), texts={"x": text})
    rows = decode_neurons(sinky, NeuronsConfig(layers=[1])).rows(tok, best_first=True, limit=3)
    page = attach(res, heads=rep, neurons=rows).write_html(tmp_path / "r.html").read_text()
    assert "id='wl-heads'" in page and "id='wl-neurons'" in page and "first token" in page
    assert page.count("<tr><td>1</td>") == 3


def test_registered():
    spec = wl.get_method("inspect", "heads")
    assert spec.defaults()["sink_threshold"] == 0.5 and spec.defaults()["dormant_test"] == "linear"


def test_inspect_cli_adds_heads_and_neurons_sections(sinky, tok, text, tmp_path):
    from weightlab.cli import main

    sinky.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "a.txt").write_text(" ".join([text] * 2))  # two default windows of 128 tokens
    page = tmp_path / "r.html"
    args = ["inspect", str(tmp_path / "m"), "--report", str(page), "--heads", str(tmp_path / "a.txt"),
            "--neurons", "all"]
    assert main(args) == 0
    html = page.read_text()
    assert "id='wl-heads'" in html and "id='wl-neurons'" in html
    assert html.count("<tr><td>0</td>") >= 1 and html.count("<tr><td>1</td>") >= 1  # one best neuron per layer
    assert main(["inspect", str(tmp_path / "m"), "--heads", "wiki"]) == 1  # sections need --report
