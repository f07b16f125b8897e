"""Adapters on a 4-bit compressed-tensors base (QLoRA-style): QuantLinear, attach/train, folds, PEFT, CLI."""
import json
import random

import pytest
import torch
from torch import nn

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

from weightlab import adapt  # noqa: E402
from weightlab.adapt import qbase  # noqa: E402
from weightlab.errors import ConfigError, UnsupportedFormatError  # noqa: E402
from weightlab.io.hf import load_causal_lm  # noqa: E402
from weightlab.io.quantized_linear import QuantLinear, load_quantized_causal_lm, module_bytes  # noqa: E402
from weightlab.tensor.quant import rtn  # noqa: E402

GROUP = 128


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _tiny_folder(path, seed=0):
    """A tiny bf16 Llama (hidden 128, MLP 256: whole groups of 128) with a word-level tokenizer and text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(path)
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 128)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<unk>").save_pretrained(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(dense bf16 folder, W4 g128 symmetric CT folder, asymmetric CT folder, text file), made by weightlab's quantize."""
    from weightlab.compress.jobs import quantize_job

    d = tmp_path_factory.mktemp("qbase")
    _tiny_folder(d / "src")
    quantize_job(d / "src", d / "ct", "rtn", 4, GROUP, sym=True, no_eval=True, device="cpu")
    quantize_job(d / "src", d / "ct_asym", "rtn", 4, GROUP, sym=False, no_eval=True, device="cpu")
    rng = random.Random(0)
    (d / "text.txt").write_text("\n".join(" ".join(f"w{rng.randint(1, 40)}" for _ in range(12)) for _ in range(300)))
    return d


def ids(n=2, seqlen=16, seed=0):
    return torch.randint(1, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _perturb(model, std=0.02, seed=3, skip=()):
    """Non-zero B (and so a real update) on every adapter layer except those named in ``skip``."""
    g = torch.Generator().manual_seed(seed)
    for n, lay in adapt.adapter_layers(model).items():
        if n not in skip:
            with torch.no_grad():
                lay.adapter.lora_B.copy_(torch.randn(lay.adapter.lora_B.shape, generator=g) * std)


# -- the module ---------------------------------------------------------------------------------------
def test_hand_packed_codes_dequantize_to_scale_times_code():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q = torch.arange(-8, 8, dtype=torch.int8).repeat(4, 16)  # (4, 256): every code in every group
    s = torch.tensor([[0.5, 2.0], [1.0, 0.25], [3.0, 1.5], [0.125, 4.0]], dtype=torch.bfloat16)
    lin = QuantLinear(256, 4, bits=4, group_size=GROUP, scale_dtype=torch.bfloat16, dtype=torch.float32)
    lin.weight_packed, lin.weight_scale = pack_to_int32(q, 4), s
    assert torch.equal(lin.codes(), q.to(torch.int16))
    expect = q.float() * s.float().repeat_interleave(GROUP, dim=1)  # exact: small powers of two times small ints
    assert torch.equal(lin.weight, expect)
    x = torch.randn(3, 256)
    assert torch.equal(lin(x), x @ expect.t())


def test_forward_equals_dequantized_linear_and_the_reader(folders):
    qm, _ = load_quantized_causal_lm(folders / "ct", torch.float32)
    dm, _ = load_causal_lm(folders / "ct", torch.float32)  # the reader's dequantization (io/quantized.py)
    layers = {n: m for n, m in qm.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14 and not isinstance(qm.lm_head, QuantLinear)  # lm_head is in the CT ignore list
    for n, m in layers.items():
        ref = dm.get_submodule(n)
        assert torch.equal(m.weight, ref.weight), n
        lin = nn.Linear(m.in_features, m.out_features, bias=False)
        lin.weight = nn.Parameter(m.dequantize())
        xi = torch.randn(2, 5, m.in_features)
        assert torch.equal(m(xi), lin(xi)), n
    with torch.no_grad():
        assert torch.equal(qm(ids()).logits, dm(ids()).logits)
    # no dense copy of a quantized weight: embeddings, lm_head and the five norms are all the parameters
    assert sum(p.numel() for p in qm.parameters()) == 2 * 128 * 128 + 5 * 128


def test_memory_is_a_quarter_of_bf16_and_an_eighth_of_fp32(folders):
    qm, _ = load_quantized_causal_lm(folders / "ct", torch.float32)
    down = qm.model.layers[0].mlp.down_proj  # 128 x 256, two groups per row, bf16 scales
    codes, scales, shape = 128 * 256 // 2, 128 * 2 * 2, 2 * 8
    assert module_bytes(down) == codes + scales + shape == 16912
    assert 0.25 < module_bytes(down) / (128 * 256 * 2) < 0.26  # vs bf16: (4 + 16/128) / 16 + shape bytes
    assert 0.125 < module_bytes(down) / (128 * 256 * 4) < 0.13  # vs fp32
    rep = qbase.memory_report(qm)
    assert rep["quantized_layers"] == 14 and abs(rep["bits_per_weight"] - (4 + 16 / GROUP)) < 0.01
    assert 0.25 < rep["ratio_bf16"] < 0.26 and 0.125 < rep["ratio_fp32"] < 0.13


def test_backward_saves_no_dense_weight():
    lin = QuantLinear(256, 64, bits=4, group_size=GROUP)
    lin.weight_packed = torch.randint(-2**31, 2**31 - 1, lin.weight_packed.shape, dtype=torch.int32)
    saved = []
    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = lin(x)
    assert (64, 256) not in saved and (256, 64) not in saved
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(4, 64) @ lin.dequantize())


# -- adapters on it ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_attach_keeps_output_and_gradients_equal_the_dense_base(folders, method):
    qm, _ = load_quantized_causal_lm(folders / "ct", torch.float64)
    dm, _ = load_causal_lm(folders / "ct", torch.float64)
    x = ids()
    with torch.no_grad():
        before = qm(x).logits
    for m in (qm, dm):
        adapt.attach(m, method, r=4, seed=1)
    with torch.no_grad():
        assert torch.equal(qm(x).logits, before)
    for m in (qm, dm):
        _perturb(m)
        m(x, labels=x).loss.backward()
    gq = {n: p.grad for n, p in qm.named_parameters() if p.grad is not None}
    gd = {n: p.grad for n, p in dm.named_parameters() if p.grad is not None}
    assert set(gq) == {n for n, p in qm.named_parameters() if p.requires_grad} == set(gd)
    assert all(".adapter." in n for n in gq) and len(gq) == 14 * (2 if method == "lora" else 3)
    for n in gq:
        torch.testing.assert_close(gq[n], gd[n], rtol=1e-12, atol=1e-14)
    packed = {n: b.clone() for n, b in qm.named_buffers() if n.endswith("weight_packed")}
    opt = adapt.make_optimizer(qm, 1e-2)
    opt.step()
    assert all(torch.equal(b, packed[n]) for n, b in qm.named_buffers() if n in packed)  # the base stays frozen


def test_set_weight_keeps_untouched_groups(folders):
    qm, _ = load_quantized_causal_lm(folders / "ct", torch.float32)
    lay = qm.model.layers[0].mlp.down_proj
    codes, scales = lay.codes().clone(), lay.weight_scale.clone()
    W = lay.dequantize(torch.float32)
    lay.set_weight_2d(W)  # same values: nothing moves
    assert torch.equal(lay.codes(), codes) and torch.equal(lay.weight_scale, scales)
    W2 = W.clone()
    W2[5, 130:140] += 0.01  # row 5, group 1 only
    lay.set_weight_2d(W2)
    diff = (lay.codes() != codes).view(128, 2, GROUP).any(-1) | (lay.weight_scale != scales)
    assert diff.sum() <= 1 and not diff[:, 0].any() and diff[torch.arange(128) != 5].sum() == 0
    expect = rtn(W2[5:6, 128:], 4, GROUP, sym=True, scale_dtype="bfloat16")
    assert torch.equal(lay.codes()[5:6, 128:], expect.codes.to(torch.int16) - 8)



def test_keep_scales_moves_a_code_only_past_half_a_step(folders):
    qm, _ = load_quantized_causal_lm(folders / "ct", torch.float32)
    lay = qm.model.layers[0].mlp.down_proj
    lay.keep_scales = True
    codes, scales = lay.codes().clone(), lay.weight_scale.clone()
    s = scales.to(torch.float32)
    W = lay.dequantize(torch.float32)
    W2 = W.clone()
    W2[3, 0:4] += 0.4 * s[3, 0]  # less than half a step: codes stay
    W2[7, 130] += 1.1 * s[7, 1]  # one step and a bit: +1 (or clamped at the top code)
    W2[9, 200] -= 2.6 * s[9, 1]  # -3 steps (or clamped at the bottom code)
    lay.set_weight_2d(W2)
    new = lay.codes()
    assert torch.equal(lay.weight_scale, scales)  # every scale kept, also in the changed groups
    expect = codes.clone()
    expect[7, 130] = min(int(codes[7, 130]) + 1, 7)
    expect[9, 200] = max(int(codes[9, 200]) - 3, -8)
    assert torch.equal(new, expect)

def _trained(folders, tmp_path, method="lora"):
    qm, _ = load_quantized_causal_lm(folders / "ct", torch.float32)
    adapt.attach(qm, method, targets=["q_proj", "v_proj", "down_proj"], r=4, seed=1)
    _perturb(qm, skip={"model.layers.1.self_attn.v_proj"})  # this one keeps B = 0: its fold changes nothing
    adapt.save(qm, tmp_path / "adapter", base_model=str(folders / "ct"))
    return qm


def test_dense_fold_equals_the_fold_into_the_dequantized_base(folders, tmp_path):
    from weightlab.io.reader import open_checkpoint

    _trained(folders, tmp_path)
    rep = qbase.fold_job(tmp_path / "adapter", folders / "ct", tmp_path / "dense", dtype="float32")
    assert rep["format"] == "hf" and rep["layers"] == 6
    dm, _ = load_causal_lm(folders / "ct", torch.float32)
    adapt.load(dm, tmp_path / "adapter")
    adapt.fold(dm)
    sd = dm.state_dict()
    with open_checkpoint(tmp_path / "dense") as ck:
        assert ck.quantization is None and "quantization_config" not in (ck.config or {})
        assert set(ck.names()) == set(sd)
        for n in ck.names():
            assert torch.equal(ck.get(n), sd[n]), n


def test_requantized_fold_keeps_untouched_codes_and_rounds_the_rest(folders, tmp_path):
    qm = _trained(folders, tmp_path)
    rep = qbase.fold_job(tmp_path / "adapter", folders / "ct", tmp_path / "rq", requantize="rtn")
    assert rep["format"] == "compressed-tensors" and 0 < rep["changed_groups"] < 1
    cfg = json.loads((tmp_path / "rq" / "config.json").read_text())["quantization_config"]
    assert cfg == json.loads((folders / "ct" / "config.json").read_text())["quantization_config"]
    base, _ = load_quantized_causal_lm(folders / "ct", torch.float32)
    out, _ = load_quantized_causal_lm(tmp_path / "rq", torch.float32)
    for n in ("model.layers.1.self_attn.v_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"):
        assert torch.equal(out.get_submodule(n).weight_packed, base.get_submodule(n).weight_packed), n
        assert torch.equal(out.get_submodule(n).weight_scale, base.get_submodule(n).weight_scale), n
    n = "model.layers.0.self_attn.q_proj"
    Wm = adapt.adapter_layers(qm)[n].merged_weight()
    expect = rtn(Wm, 4, GROUP, sym=True, scale_dtype="bfloat16")
    assert torch.equal(out.get_submodule(n).codes(), expect.codes.to(torch.int16) - 8)
    step = expect.scales.float().repeat_interleave(GROUP, dim=1)
    # half a step (a group's largest |w| can sit 7.5 * 2^-8 steps further: its bf16 scale rounds down), plus
    # the readers' rounding of s*q to the scales' bf16
    err = (out.get_submodule(n).dequantize(torch.float32) - Wm).abs()
    assert (err <= step * (0.5 + 7.5 * 2**-8) + Wm.abs() * 2**-8).all()
    # transformers' own compressed-tensors loader, in the scales' dtype (it multiplies in the model's dtype)
    tm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rq", dtype=torch.bfloat16)
    out16, _ = load_quantized_causal_lm(tmp_path / "rq", torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(tm(ids()).logits, out16(ids()).logits)


def test_peft_export_records_the_base_and_matches_over_the_dequantized_base(folders, tmp_path):
    peft = pytest.importorskip("peft")
    qm = _trained(folders, tmp_path)
    adapt.export_folder_peft(tmp_path / "adapter", tmp_path / "peft")
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == "ct"
    dense, _ = load_causal_lm(folders / "ct", torch.float32)
    pm = peft.PeftModel.from_pretrained(dense, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids()).logits, qm(ids()).logits, rtol=1e-5, atol=1e-5)


# -- refusals ---------------------------------------------------------------------------------------------
def test_refuses_asymmetric_and_non_ct_folders(folders, tmp_path):
    with pytest.raises(UnsupportedFormatError, match="asymmetric"):
        load_quantized_causal_lm(folders / "ct_asym")
    with pytest.raises(ConfigError, match="not a compressed-tensors"):
        load_quantized_causal_lm(folders / "src")
    _trained(folders, tmp_path)
    with pytest.raises(ConfigError, match="not a compressed-tensors"):
        qbase.fold_job(tmp_path / "adapter", folders / "src", tmp_path / "o")
    with pytest.raises(ConfigError, match="requantize"):
        qbase.fold_job(tmp_path / "adapter", folders / "ct", tmp_path / "o", requantize="nf4")
    with pytest.raises(ConfigError, match="not a weightlab adapter"):
        qbase.fold_job(folders / "ct", folders / "ct", tmp_path / "o")
    assert not (tmp_path / "o").exists()


# -- the command line -------------------------------------------------------------------------------------
def test_cli_tune_on_a_4bit_base_then_fold_both_ways(folders, tmp_path):
    from weightlab.cli import main

    out = tmp_path / "run"
    argv = ["tune", str(folders / "ct"), "--data", str(folders / "text.txt"), "--steps", "3", "--seqlen", "16",
            "--batch-size", "2", "--rank", "4", "--lr", "1e-2", "-o", str(out)]
    assert main(argv) in (0, None)
    conf = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert conf["base_model"] == str(folders / "ct")
    merged, _ = load_quantized_causal_lm(out / "merged", torch.float32)  # re-quantized, still packed
    assert any(isinstance(m, QuantLinear) for m in merged.modules())
    gptq = ["--requantize", "gptq", "--calib", str(folders / "text.txt"), "--nsamples", "4", "--seqlen", "16",
            "--device", "cpu"]
    for i, (extra, fmt) in enumerate((([], None), (["--requantize", "rtn"], "pack-quantized"), (gptq, "pack-quantized"))):
        o = tmp_path / f"fold{i}"
        assert main(["adapter", "fold", str(out / "adapter"), "--base", str(folders / "ct"), *extra, "-o", str(o)]) \
            in (0, None)
        assert json.loads((o / "config.json").read_text()).get("quantization_config", {}).get("format") == fmt
        if fmt:
            load_quantized_causal_lm(o)  # the base's scheme again: it loads packed
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
