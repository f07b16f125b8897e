"""Feature neurons through the LM head on tiny Llamas with planted neurons: decode, search, clamp, compare, CLI."""
import copy
import json

import pytest
import torch

import weightlab as wl
from weightlab.inspect.neurons import (NeuronsConfig, clamp_neurons, clamped, compare_neurons, decode_neurons,
                                       find_neurons, parse_neuron, token_variants)

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from _internals_tiny import tiny_llama, word_tokenizer  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny tensors: one thread (conftest.py)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def planted(tok):
    """Layer 1 neuron 7 writes the unembedding of 'dog'; layer 0 neuron 3 reads that of 'river'.
    The LM head is wide (std 0.3), so a clamped neuron can dominate the logits after the final norm."""
    m = tiny_llama(len(tok), head_std=0.3)
    dog, river = tok.convert_tokens_to_ids(["dog", "river"])
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[:, 7] = 0.05 * m.lm_head.weight[dog]
        m.model.layers[0].mlp.up_proj.weight[3] = 2.0 * m.lm_head.weight[river]
    return m, dog, river


def by_hand(m, vec):
    """Final RMSNorm and LM head written out: W_U (g * v / sqrt(mean(v^2) + eps)), softmax."""
    g, eps = m.model.norm.weight, m.model.norm.variance_epsilon
    x = g * vec / torch.sqrt(vec.pow(2).mean(-1, keepdim=True) + eps)
    return torch.softmax(x @ m.lm_head.weight.T, -1)


def test_planted_vectors_decode_to_their_token_and_match_the_hand_formula(planted):
    m, dog, river = planted
    down = decode_neurons(m, NeuronsConfig(top_k=4))
    assert int(down.top_ids[1][7, 0]) == dog and down.neurons == 2 * 64
    up = decode_neurons(m, NeuronsConfig(vector="up", layers=[0]))
    assert list(up.top_ids) == [0] and int(up.top_ids[0][3, 0]) == river
    with torch.no_grad():
        p = by_hand(m, m.model.layers[1].mlp.down_proj.weight.T)
        q = by_hand(m, -m.model.layers[0].mlp.gate_proj.weight)
    top, idx = p.topk(4, -1)
    assert torch.equal(down.top_ids[1], idx) and torch.allclose(down.top_probs[1], top, atol=1e-6)
    neg = decode_neurons(m, NeuronsConfig(vector="gate", negative=True, layers=[-2], top_k=2))
    assert torch.equal(neg.top_ids[0], q.topk(2, -1).indices)
    # splitting the matmul into small blocks changes nothing
    tiny_chunks = decode_neurons(m, NeuronsConfig(top_k=4, chunk_mib=1))
    assert all(torch.equal(tiny_chunks.top_ids[k], down.top_ids[k]) for k in down.top_ids)


def test_search_by_token_puts_the_planted_neuron_first(planted, tok):
    m, dog, _ = planted
    assert token_variants(tok, "dog") == [dog]  # " dog", "Dog": same word or unknown in a word-level vocab
    rows = find_neurons(m, tok, "dog", limit=5)
    assert (rows[0]["layer"], rows[0]["neuron"]) == (1, 7) and rows[0]["top_tokens"][0] == "dog"
    assert set(rows[0]) == {"layer", "neuron", "top_tokens", "score"}
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    with torch.no_grad():
        assert rows[0]["score"] == pytest.approx(float(by_hand(m, m.model.layers[1].mlp.down_proj.weight[:, 7])[dog]))
    with pytest.raises(wl.ConfigError, match="not a single token"):
        token_variants(tok, "zebra")


def test_clamping_raises_the_neurons_token_monotonically_and_hooks_go_away(planted, tok):
    m, dog, _ = planted
    ids = tok("the cat sat on", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = m(ids).logits
        probs = []
        for v in (-50.0, 0.0, 50.0, 200.0, 1000.0):
            with clamped(m, [(1, 7)], v):
                probs.append(float(torch.softmax(m(ids).logits[0, -1], -1)[dog]))
        assert torch.equal(m(ids).logits, ref)
    assert probs == sorted(probs) and probs[-1] > 0.9 and probs[0] < probs[1] / 10
    mat = tok.convert_tokens_to_ids("mat")
    r = clamp_neurons(m, tok, [(1, 7)], 1000.0, "the cat sat on", max_new_tokens=4, watch=[mat])
    assert r["watched"][0]["token"] == "mat" and r["watched"][0]["after"] < 0.01
    assert r["watched"][1]["token"] == "dog" and r["watched"][1]["after"] > 0.9 > r["watched"][1]["before"]
    assert r["after"]["top"][0]["token"] == "dog" and r["after"]["text"].split() == ["dog"] * 4
    assert r["before"]["text"] != r["after"]["text"]
    assert r["neurons"] == ["1:7"] and "1:7" in r["activation_on_prompt"]


def test_compare_counts_exactly_the_changed_neurons(planted, tok):
    m, dog, river = planted
    assert compare_neurons(m, m)["same_top_token"] == 1.0
    other = copy.deepcopy(m)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight[:, 7] = other.lm_head.weight[river]
    r = compare_neurons(m, other, NeuronsConfig(vector="down"))
    assert r["neurons"] == 128 and r["same_top_token"] == pytest.approx(127 / 128)
    decoded = decode_neurons(m, NeuronsConfig(top_k=3))  # a base decoded once serves several comparisons
    assert compare_neurons(decoded, other)["same_top_token"] == r["same_top_token"]
    with pytest.raises(wl.ConfigError, match="cannot compare down vectors with up"):
        compare_neurons(decoded, other, NeuronsConfig(vector="up"))
    assert r["per_layer"] == {0: 1.0, 1: pytest.approx(63 / 64)}
    assert compare_neurons(m, other, NeuronsConfig(vector="up"))["same_top_token"] == 1.0
    with pytest.raises(wl.ConfigError, match="LM heads differ"):
        compare_neurons(m, tiny_llama(len(tok) + 1))


def test_bad_neurons_are_clear_errors(planted):
    m, _, _ = planted
    assert parse_neuron("1:7") == (1, 7)
    with pytest.raises(wl.ConfigError, match="LAYER:INDEX"):
        parse_neuron("7")
    with pytest.raises(wl.ConfigError, match="layers 0..1"):
        with clamped(m, [(5, 0)], 1.0):
            pass
    with pytest.raises(wl.ConfigError, match="neurons 0..63"):
        with clamped(m, [(0, 64)], 1.0):
            pass
    with pytest.raises(wl.ConfigError, match="layer 9 does not exist"):
        decode_neurons(m, NeuronsConfig(layers=[9]))
    with pytest.raises(wl.ConfigError, match="Llama-style"):
        decode_neurons(torch.nn.Linear(2, 2))


def test_neurons_cli_show_search_clamp_compare(planted, tok, tmp_path, capsys):
    from weightlab.cli import main

    m, _, _ = planted
    m.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    path = str(tmp_path / "m")
    assert main(["neurons", path, "--token", "dog", "--limit", "3", "--json", str(tmp_path / "n.json")]) == 0
    out = capsys.readouterr().out
    assert "decoded 128 down vectors of 2 layers" in out
    rows = json.loads((tmp_path / "n.json").read_text())
    assert len(rows) == 3 and (rows[0]["layer"], rows[0]["neuron"]) == (1, 7) and rows[0]["top_tokens"][0] == "dog"
    assert main(["neurons", path, "--layer", "0", "--vector", "up", "--json", str(tmp_path / "all.json")]) == 0
    every = json.loads((tmp_path / "all.json").read_text())
    assert len(every) == 64 and [r["neuron"] for r in every] == list(range(64)) and every[3]["top_tokens"][0] == "river"
    assert main(["neurons", "show", path, "--layer", "1", "--limit", "1", "--report", str(tmp_path / "n.html")]) == 0
    assert (tmp_path / "n.html").read_text().count("<tr><td>1</td>") == 1
    capsys.readouterr()
    assert main(["neurons", "clamp", path, "--neuron", "1:7", "--value", "1000", "--prompt", "the cat sat on",
                 "--max-new-tokens", "3", "--watch", "cat"]) == 0
    out = capsys.readouterr().out
    assert "'dog'" in out and "'cat'" in out and "after text: 'dog dog dog'" in out
    assert main(["neurons", "compare", path, path]) == 0
    assert "100.00% of 128 up neurons" in capsys.readouterr().out
    assert main(["neurons", "clamp", path, "--neuron", "1-7", "--value", "1", "--prompt", "x"]) == 1
    assert main(["neurons", path, "--token", "zebra"]) == 1
    assert "not a single token" in capsys.readouterr().err


def test_registered():
    spec = wl.get_method("inspect", "neurons")
    assert spec.defaults()["vector"] == "down" and "2501.02688" in spec.paper
