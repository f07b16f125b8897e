"""Reading compressed-tensors, GPTQ and AWQ folders as dense tensors.

The fixtures are packed by small reference packers written here from the published bit layouts
(one Python integer per row, bit by bit), independently of weightlab's vectorised unpackers.
"""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import weightlab as wl
from weightlab.cli import main
from weightlab.errors import UnsupportedFormatError
from weightlab.io.quantized import QuantizedView, unpack_rows


# ---- reference packers ----------------------------------------------------------------------
def ref_stream(values, bits):
    """Values (non-negative, < 2**bits) laid LSB-first into one bit stream -> signed int32 words."""
    acc = 0
    for i, v in enumerate(values):
        assert 0 <= v < 2 ** bits
        acc |= int(v) << (i * bits)
    words = [(acc >> (32 * k)) & 0xFFFFFFFF for k in range(math.ceil(len(values) * bits / 32))]
    return [w - 2 ** 32 if w >= 2 ** 31 else w for w in words]


def ref_rows(mat, bits):
    return torch.tensor([ref_stream(r, bits) for r in mat.tolist()], dtype=torch.int32)


def ref_legacy_rows(mat, bits):
    """compressed-tensors <= 0.17: floor(32/bits) values per word, no straddling."""
    per = 32 // bits
    out = []
    for r in mat.tolist():
        words = []
        for k in range(0, len(r), per):
            acc = sum(int(v) << (j * bits) for j, v in enumerate(r[k:k + per]))
            words.append(acc - 2 ** 32 if acc >= 2 ** 31 else acc)
        out.append(words)
    return torch.tensor(out, dtype=torch.int32)


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def ref_awq(mat):
    """[rows, cols] 4-bit codes -> [rows, cols/8]: nibble k of word j = column 8j + AWQ_ORDER[k]."""
    rows, cols = mat.shape
    out = np.zeros((rows, cols // 8), dtype=np.int64)
    for j in range(cols // 8):
        for k in range(8):
            out[:, j] |= mat[:, 8 * j + AWQ_ORDER[k]].numpy().astype(np.int64) << (4 * k)
    out = np.where(out >= 2 ** 31, out - 2 ** 32, out)
    return torch.from_numpy(out.astype(np.int32))


def u32(words):
    return [w & 0xFFFFFFFF for w in words.reshape(-1).tolist()]


# ---- golden vectors (deploy-formats.md §1.4) -------------------------------------------------
def test_ct_pack_golden_vectors():
    q4 = torch.tensor([[-8, -7, 0, 1, 2, 3, 4, 7] + [5] * 8])
    packed = ref_rows(q4 + 8, 4)
    assert u32(packed) == [0xFCBA9810, 0xDDDDDDDD]
    assert torch.equal(unpack_rows(packed, 4, 16) - 8, q4)
    q8 = torch.tensor([[-128, 127, 0, 1]])
    packed8 = ref_rows(q8 + 128, 8)
    assert u32(packed8) == [0x8180FF00]
    assert torch.equal(unpack_rows(packed8, 8, 4) - 128, q8)
    # zero points are packed along dim 0: one column of codes -8..7
    zcol = torch.arange(-8, 8).reshape(16, 1)
    zp = ref_rows(zcol.t() + 8, 4).t()  # [ceil(16*4/32), 1] = [2, 1]
    assert zp.shape == (2, 1) and u32(zp) == [0x76543210, 0xFEDCBA98]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_unpack_matches_reference_packer(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2 ** bits, (5, 37), generator=g)  # odd sizes: padding and straddling
    assert torch.equal(unpack_rows(ref_rows(q, bits), bits, 37), q)
    assert torch.equal(unpack_rows(ref_legacy_rows(q, bits), bits, 37, dense=False), q)


# ---- fixtures --------------------------------------------------------------------------------
OUT, IN, G = 24, 64, 32


def _codes(bits, shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2 ** bits, shape, generator=g)


def _scales(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 0.02 + 0.001).half()


def _write(folder, tensors, config):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _ct_config(fmt, bits, strategy, group=None, symmetric=True, typ="int", extra=None):
    w = {"num_bits": bits, "type": typ, "symmetric": symmetric, "strategy": strategy, "group_size": group,
         "dynamic": False, **(extra or {})}
    return {"architectures": ["X"], "quantization_config": {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "format": fmt}}, "ignore": ["lm_head"]}}


@pytest.mark.parametrize("bits,sym,legacy", [(4, True, False), (8, True, False), (4, False, False),
                                             (3, True, False), (3, True, True)])
def test_ct_pack_quantized_group(tmp_path, bits, sym, legacy):
    half = 2 ** (bits - 1)
    q = _codes(bits, (OUT, IN), 1) - half  # signed codes
    s = _scales((OUT, IN // G), 2)
    pack = ref_legacy_rows if legacy else ref_rows
    t = {"l.weight_packed": pack(q + half, bits), "l.weight_scale": s,
         "l.weight_shape": torch.tensor([OUT, IN]), "norm.weight": torch.ones(IN)}
    z = torch.zeros(OUT, IN // G, dtype=torch.int64)
    if not sym:
        z = _codes(bits, (OUT, IN // G), 3) - half
        t["l.weight_zero_point"] = ref_rows(z.t() + half, bits).t().contiguous()  # packed along out
    folder = _write(tmp_path / "ct", t, _ct_config("pack-quantized", bits, "group", G, sym))
    ck = wl.open_checkpoint(folder)
    assert sorted(ck.names()) == ["l.weight", "norm.weight"]
    want = (s.float().repeat_interleave(G, 1) * (q - z.repeat_interleave(G, 1)).float()).half()
    got = ck.get("l.weight")
    assert got.dtype == torch.float16 and torch.equal(got, want)
    assert ck.info("l.weight").shape == (OUT, IN)
    assert ck.quantization["format"] == "compressed-tensors" and ck.quantization["bits"] == bits
    assert ck.raw is not None and "l.weight_packed" in ck.raw
    assert torch.equal(ck.get("l.weight_packed"), t["l.weight_packed"])  # stored names stay readable
    assert "l.weight_packed" in wl.open_checkpoint(folder, decode=False)


def test_ct_pack_quantized_channel_and_g_idx(tmp_path):
    q = _codes(4, (OUT, IN), 4) - 8
    s = _scales((OUT, 1), 5)
    perm = torch.randperm(IN, generator=torch.Generator().manual_seed(6))
    g_idx = (perm // G).to(torch.int32)  # activation order: columns belong to arbitrary groups
    sg = _scales((OUT, IN // G), 7)
    t = {"a.weight_packed": ref_rows(q + 8, 4), "a.weight_scale": s, "a.weight_shape": torch.tensor([OUT, IN]),
         "b.weight_packed": ref_rows(q + 8, 4), "b.weight_scale": sg, "b.weight_shape": torch.tensor([OUT, IN]),
         "b.weight_g_idx": g_idx}
    ck = wl.open_checkpoint(_write(tmp_path / "ct", t, _ct_config("pack-quantized", 4, "channel")))
    assert torch.equal(ck.get("a.weight"), (s.float() * q.float()).half())
    assert torch.equal(ck.get("b.weight"), (sg.float()[:, g_idx.long()] * q.float()).half())


def test_ct_int_float_and_block(tmp_path):
    g = torch.Generator().manual_seed(8)
    wi = torch.randint(-128, 128, (OUT, IN), generator=g).to(torch.int8)
    si = _scales((OUT, 1), 9).to(torch.bfloat16)
    ck = wl.open_checkpoint(_write(tmp_path / "int", {"l.weight": wi, "l.weight_scale": si,
                                                      "l.input_scale": torch.ones(1)},
                                   _ct_config("int-quantized", 8, "channel")))
    assert ck.names() == ["l.weight"]  # the activation scale has no place in a dense model
    assert torch.equal(ck.get("l.weight"), (wi.float() * si.float()).bfloat16())
    wf = torch.randn(OUT, IN, generator=g).to(torch.float8_e4m3fn)
    sb = _scales((2, 1), 10).float()  # block 16x64 over [24, 64]: rows 0-15 and 16-23
    cfg = _ct_config("float-quantized", 8, "block", typ="float", extra={"block_structure": [16, 64]})
    ck = wl.open_checkpoint(_write(tmp_path / "fp8", {"l.weight": wf, "l.weight_scale": sb}, cfg))
    want = wf.float() * torch.cat([sb[0].expand(16, IN), sb[1].expand(8, IN)])
    assert torch.equal(ck.get("l.weight"), want)
    assert ck.quantization["bits_per_weight"] == pytest.approx((OUT * IN * 8 + 2 * 32) / (OUT * IN), abs=1e-4)


@pytest.mark.parametrize("fmt", ["sparse-24-bitmask", "sparse-bitmask"])
def test_ct_legacy_sparse_bitmask(tmp_path, fmt):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(OUT, IN, generator=g)
    keep = w.reshape(OUT, IN // 4, 4).abs().argsort(-1, descending=True)[..., :2]
    mask = torch.zeros(OUT, IN // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(OUT, IN)
    w = w * mask
    bm = torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little"))
    if fmt == "sparse-24-bitmask":
        t = {"l.compressed": w[mask].reshape(OUT, IN // 2), "l.bitmask": bm, "l.shape": torch.tensor([[OUT], [IN]])}
    else:
        nnz = mask.sum(1)
        t = {"l.compressed": w[mask], "l.bitmask": bm, "l.shape": torch.tensor([OUT, IN]),
             "l.row_offsets": torch.cumsum(nnz, 0) - nnz}
    cfg = {"quantization_config": {"quant_method": "compressed-tensors", "format": "dense",
                                   "sparsity_config": {"format": fmt, "targets": ["Linear"], "ignore": [],
                                                       "sparsity_structure": "2:4", "global_sparsity": 0.5}}}
    ck = wl.open_checkpoint(_write(tmp_path / fmt, t, cfg))
    assert ck.names() == ["l.weight"] and torch.equal(ck.get("l.weight"), w)


def test_ct_marlin24_refused(tmp_path):
    cfg = _ct_config("marlin-24", 4, "group", 128)
    with pytest.raises(UnsupportedFormatError, match="marlin-24"):
        wl.open_checkpoint(_write(tmp_path / "m", {"x": torch.ones(1)}, cfg))


# ---- GPTQ --------------------------------------------------------------------------------------
def gptq_tensors(bits, q, z, s, *, v2, g_idx=None):
    """q [in, out] codes, z [groups, out] zeros, s [groups, out] scales -> GPTQ tensors."""
    stored_z = z if v2 else z - 1  # v1 keeps zero - 1
    t = {"qweight": ref_rows(q.t(), bits).t().contiguous(),  # packed along in
         "qzeros": ref_rows(stored_z, bits), "scales": s}
    if g_idx is not None:
        t["g_idx"] = g_idx.to(torch.int32)
    return t


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("v2", [False, True])
def test_gptq(tmp_path, bits, v2):
    n_in = 96 if bits == 3 else IN  # 3-bit packs 32 rows into 3 words
    q = _codes(bits, (n_in, OUT), 12)
    z = _codes(bits, (n_in // G, OUT), 13).clamp(min=1)  # v1 cannot store a zero of 0 (it would wrap)
    s = _scales((n_in // G, OUT), 14)
    t = {f"m.{k}": v for k, v in gptq_tensors(bits, q, z, s, v2=v2).items()}
    t["m.bias"] = torch.arange(OUT, dtype=torch.float16)
    qc = {"quant_method": "gptq", "bits": bits, "group_size": G, "desc_act": False, "sym": False,
          "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    ck = wl.open_checkpoint(_write(tmp_path / "g", t, {"quantization_config": qc}))
    g = torch.arange(n_in) // G
    want = (s.float()[g] * (q - z[g]).float()).t().half()
    assert sorted(ck.names()) == ["m.bias", "m.weight"]
    assert torch.equal(ck.get("m.weight"), want) and torch.equal(ck.get("m.bias"), t["m.bias"])
    assert ck.quantization["bits"] == bits and ck.quantization["format"] == "gptq"


def test_gptq_v1_and_v2_differ_by_one(tmp_path):
    """The same stored bytes read as v1 and as v2: zero points differ by exactly one step."""
    q, z, s = _codes(4, (IN, OUT), 15), _codes(4, (IN // G, OUT), 16).clamp(1, 14), _scales((IN // G, OUT), 17)
    t = {f"m.{k}": v for k, v in gptq_tensors(4, q, z, s, v2=True).items()}
    read = {}
    for fmt in ("gptq", "gptq_v2"):
        qc = {"quant_method": "gptq", "bits": 4, "group_size": G, "checkpoint_format": fmt}
        read[fmt] = wl.open_checkpoint(_write(tmp_path / fmt, t, {"quantization_config": qc})).get("m.weight").float()
    step = s.float()[torch.arange(IN) // G].t()
    assert torch.allclose(read["gptq_v2"] - read["gptq"], step, atol=1e-3)


def test_gptq_desc_act_g_idx_and_side_file(tmp_path):
    q, s = _codes(4, (IN, OUT), 18), _scales((IN // G, OUT), 19)
    z = torch.full((IN // G, OUT), 8)
    g_idx = torch.randperm(IN, generator=torch.Generator().manual_seed(20)) // G
    t = {f"m.{k}": v for k, v in gptq_tensors(4, q, z, s, v2=False, g_idx=g_idx).items()}
    folder = _write(tmp_path / "g", t, {"architectures": ["X"]})
    (folder / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": G, "desc_act": True}))
    ck = wl.open_checkpoint(folder)
    want = (s.float()[g_idx] * (q - 8).float()).t().half()
    assert torch.equal(ck.get("m.weight"), want) and ck.quantization["desc_act"] is True


# ---- AWQ ---------------------------------------------------------------------------------------
def test_awq_gemm(tmp_path):
    q, z, s = _codes(4, (IN, OUT), 21), _codes(4, (IN // G, OUT), 22), _scales((IN // G, OUT), 23)
    t = {"m.qweight": ref_awq(q), "m.qzeros": ref_awq(z), "m.scales": s}
    qc = {"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True, "version": "gemm"}
    ck = wl.open_checkpoint(_write(tmp_path / "a", t, {"quantization_config": qc}))
    g = torch.arange(IN) // G
    assert torch.equal(ck.get("m.weight"), ((q - z[g]).float() * s.float()[g]).t().half())
    # the interleave matters: reading nibbles in plain order gives other columns
    plain = unpack_rows(t["m.qweight"], 4, OUT)
    assert not torch.equal(plain, q) and torch.equal(QuantizedView.awq_unpack(t["m.qweight"]), q)
    qc["version"] = "gemv"
    with pytest.raises(UnsupportedFormatError, match="gemv"):
        wl.open_checkpoint(_write(tmp_path / "b", t, {"quantization_config": qc}))


# ---- a GPTQ Llama through the CLI and transformers ----------------------------------------------
def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)


@pytest.fixture
def gptq_llama(tmp_path):
    """A tiny Llama whose Linear layers are stored as GPTQ v1 4-bit g32; returns (folder, dense state dict)."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    sd, dense = {}, {}
    for name, p in model.state_dict().items():
        mod = name.removesuffix(".weight")
        if name.endswith("_proj.weight"):
            w = p.detach().t()  # [in, out]
            wg = w.reshape(-1, G, w.shape[1])
            lo, hi = wg.amin(1), wg.amax(1)
            s = ((hi - lo) / 15).clamp(min=1e-5).half()
            z = (-lo / s.float()).round().clamp(1, 15).long()
            q = (wg / s.float()[:, None] + z[:, None]).round().clamp(0, 15).long().reshape(w.shape)
            for k, v in gptq_tensors(4, q, z, s, v2=False).items():
                sd[f"{mod}.{k}"] = v
            g = torch.arange(w.shape[0]) // G
            dense[name] = (s.float()[g] * (q - z[g]).float()).t().half()
        elif name != "lm_head.weight" or not model.config.tie_word_embeddings:
            sd[name] = p.detach().clone()
            dense[name] = sd[name]
    folder = tmp_path / "gptq-llama"
    cfg = model.config.to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": G, "desc_act": False,
                                  "sym": False, "checkpoint_format": "gptq"}
    _write(folder, sd, cfg)
    from _tiny_llama import tiny_tokenizer

    tiny_tokenizer(folder)
    return folder, dense


def test_gptq_llama_reads_dense_and_loads(gptq_llama, one_thread):
    folder, dense = gptq_llama
    ck = wl.open_checkpoint(folder)
    assert sorted(ck.names()) == sorted(dense)
    for n, t in dense.items():
        assert torch.equal(ck.get(n), t), n
    assert ck.quantization["bits_per_weight"] == pytest.approx(4 + (16 + 4) / G, abs=0.01)
    # load_causal_lm builds a plain Llama from the dense tensors (no GPTQ kernel package needed)
    from weightlab.io.hf import load_causal_lm

    model, tok = load_causal_lm(folder)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, dense["model.layers.1.mlp.down_proj.weight"].float())
    assert not hasattr(model.config, "quantization_config") and tok.convert_tokens_to_ids("<|im_end|>") == 2


def test_prune_runs_on_a_gptq_folder(gptq_llama, tmp_path, one_thread):
    folder, dense = gptq_llama
    out = tmp_path / "pruned"
    assert main(["prune", str(folder), "--method", "magnitude", "--sparsity", "0.5", "--no-eval", "-o", str(out)]) == 0
    ck = wl.open_checkpoint(out)
    assert ck.quantization is None and "quantization_config" not in json.loads((out / "config.json").read_text())
    w = ck.get("model.layers.0.self_attn.o_proj.weight")
    assert w.dtype == torch.float16 and (w == 0).float().mean() == pytest.approx(0.5, abs=0.01)


def test_info_and_inspect_on_gptq_folder(gptq_llama, capsys):
    folder, dense = gptq_llama
    assert main(["info", str(folder), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["quantization"]["format"] == "gptq" and d["quantization"]["bits"] == 4
    assert d["num_parameters"] == sum(t.numel() for t in dense.values())
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "gptq" in out and "bits/weight" in out
    assert main(["inspect", str(folder), "--json", "-", "--threads", "1"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert "model.layers.0.self_attn.q_proj.weight" in json.dumps(rep)


def test_dense_copy_of_gptq_folder_drops_quantization_config(gptq_llama, tmp_path):
    folder, dense = gptq_llama
    with wl.open_checkpoint(folder) as ck:
        out = wl.save_state_dict(ck.state_dict(), tmp_path / "dense", template=folder)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    assert wl.open_checkpoint(out).quantization is None


# ---- against the compressed-tensors library itself ---------------------------------------------
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_ct_library_packing_reads_back(tmp_path, bits):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    half = 2 ** (bits - 1)
    q = _codes(bits, (OUT, IN), 30) - half
    z = _codes(bits, (OUT, IN // G), 31) - half
    s = _scales((OUT, IN // G), 32)
    t = {"l.weight_packed": ct.pack_to_int32(q.to(torch.int8), bits), "l.weight_scale": s,
         "l.weight_shape": torch.tensor([OUT, IN]),
         "l.weight_zero_point": ct.pack_to_int32(z.to(torch.int8), bits, packed_dim=0).contiguous()}
    ck = wl.open_checkpoint(_write(tmp_path / "ct", t, _ct_config("pack-quantized", bits, "group", G, False)))
    want = (s.float().repeat_interleave(G, 1) * (q - z.repeat_interleave(G, 1)).float()).half()
    assert torch.equal(ck.get("l.weight"), want)


def test_awq_equals_its_compressed_tensors_conversion(tmp_path):
    """compressed-tensors' AutoAWQConverter (reference AWQ -> CT) and our two readers agree exactly."""
    conv = pytest.importorskip("compressed_tensors.entrypoints.convert.converters.autoawq")
    q, z, s = _codes(4, (IN, OUT), 33), _codes(4, (IN // G, OUT), 34), _scales((IN // G, OUT), 35)
    awq = {"m.qweight": ref_awq(q), "m.qzeros": ref_awq(z), "m.scales": s}
    qc = {"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True, "version": "gemm"}
    a = wl.open_checkpoint(_write(tmp_path / "awq", dict(awq), {"quantization_config": qc})).get("m.weight")
    ct_tensors = conv.AutoAWQConverter(bits=4, group_size=G).process(dict(awq))
    c = wl.open_checkpoint(_write(tmp_path / "ct", ct_tensors, _ct_config("pack-quantized", 4, "group", G, False)))
    assert sorted(ct_tensors) == ["m.weight_packed", "m.weight_scale", "m.weight_shape", "m.weight_zero_point"]
    assert torch.equal(c.get("m.weight"), a)


def test_ct_dense_fake_quant_weights_are_not_rescaled(tmp_path):
    w = torch.randn(OUT, IN).bfloat16()
    t = {"l.weight": w, "l.weight_scale": torch.full((OUT, 1), 0.5).bfloat16()}
    ck = wl.open_checkpoint(_write(tmp_path / "d", t, _ct_config("dense", 4, "channel")))
    assert torch.equal(ck.get("l.weight"), w)


def test_stored_names_stay_reachable(tmp_path):
    t = {"l.weight_packed": ref_rows(_codes(4, (OUT, IN), 40), 4), "l.weight_scale": _scales((OUT, 1), 41),
         "l.weight_shape": torch.tensor([OUT, IN])}
    ck = wl.open_checkpoint(_write(tmp_path / "ct", t, _ct_config("pack-quantized", 4, "channel")))
    assert ck.names() == ["l.weight"] and "l.weight_scale" in ck and "nothing" not in ck
    assert ck.info("l.weight_scale").dtype == torch.float16 and ck.info("l.weight").shape == (OUT, IN)


def test_export_hf_from_gptq_folder(gptq_llama, tmp_path, capsys):
    folder, dense = gptq_llama
    out = tmp_path / "dense"
    assert main(["export", str(folder), "--format", "hf", "-o", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["source"]["format"] == "gptq" and rep["tensors"] == len(dense)
    ck = wl.open_checkpoint(out)
    assert ck.quantization is None and "quantization_config" not in json.loads((out / "config.json").read_text())
    assert all(torch.equal(ck.get(n), t) for n, t in dense.items())
    assert (out / "tokenizer.json").is_file()
