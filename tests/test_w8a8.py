"""SmoothQuant, W8A8 int8 (dynamic / static activations), FP8 and the FP8 KV cache (compress/smoothquant.py, fp8.py,
activations.py, tensor/quant8.py, deploy.py): the smoothing is exact with hand-computed scales, levels and scales
equal hand computations and compressed-tensors' own rounding, the written config is llm-compressor's, and the
checkpoint reads back (weightlab's reader, transformers) as the fake-quantized model."""
import copy
import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from weightlab.compress import deploy  # noqa: E402
from weightlab.compress.activations import KVRange, fake_quant  # noqa: E402
from weightlab.compress.jobs import quantize_job  # noqa: E402
from weightlab.compress.prune import to_batches  # noqa: E402
from weightlab.compress.quantize import quantize  # noqa: E402
from weightlab.errors import ConfigError  # noqa: E402
from weightlab.io.reader import open_checkpoint  # noqa: E402
from weightlab.tensor.quant8 import FP8, fake_quantize_tokens, fp8_quantize, observed_absmax  # noqa: E402

from test_awq import HELD_OUT, IDS, llama  # noqa: E402
from test_deploy_ct import save_tiny  # noqa: E402

# llm-compressor 0.14.0.1's quantization_config (compressed-tensors 0.19.0) for QuantizationModifier(scheme="W8A8")
# and scheme="FP8_DYNAMIC" with kv_cache_scheme fp8 tensor static, written from a tiny Llama; observer and version
# fields left out (metadata only: which observer ran, which CT wrote it)
LC_W8A8 = {"format": "int-quantized", "output_activations": None, "targets": ["Linear"],
           "input_activations": {"dynamic": True, "num_bits": 8, "strategy": "token", "symmetric": True, "type": "int"},
           "weights": {"dynamic": False, "num_bits": 8, "strategy": "channel", "symmetric": True, "type": "int"}}
LC_FP8_DYNAMIC = {"format": "float-quantized", "output_activations": None, "targets": ["Linear"],
                  "input_activations": {"dynamic": True, "num_bits": 8, "strategy": "token", "symmetric": True,
                                        "type": "float"},
                  "weights": {"dynamic": False, "num_bits": 8, "strategy": "channel", "symmetric": True,
                              "type": "float"}}
LC_KV = {"dynamic": False, "num_bits": 8, "strategy": "tensor", "symmetric": True, "type": "float"}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def smooth_only(model, **params):
    """SmoothQuant's block step alone through the engine (no layer is quantized); returns the records."""
    from weightlab.compress.quantize import BlockContext
    from weightlab.compress.smoothquant import smooth_block
    from weightlab.engine.calibration import layerwise
    from weightlab.registry import get_method

    cfg, record = get_method("compress", "smoothquant").make_config(params), []

    def step(run, layers, stats):
        smooth_block(BlockContext(run, layers, stats, 8, -1, True, "float32", cfg, record))

    layerwise(model, to_batches(IDS), lambda i, name, ls, st: None, hessian=False, block_step=step)
    return record


def _inputs(model, names):
    """Every listed module's inputs over the calibration batches (the original model: RTN propagates fp)."""
    mods, seen = dict(model.named_modules()), {n: [] for n in names}
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach())) for n in names]
    with torch.no_grad():
        for b in to_batches(IDS):
            model(**b)
    for h in hooks:
        h.remove()
    return seen


def test_smoothquant_fold_is_exact_with_hand_computed_scales():
    m = llama(kv_heads=2, layers=2)
    ref = copy.deepcopy(m)
    norm_out = {}
    blk = ref.model.layers[0]
    hooks = [mod.register_forward_hook(lambda mod, a, o, n=n: norm_out.setdefault(n, []).append(o.detach()))
             for n, mod in (("in", blk.input_layernorm), ("post", blk.post_attention_layernorm))]
    with torch.no_grad():
        for b in to_batches(IDS):
            ref(**b)
    for h in hooks:
        h.remove()
    record = smooth_only(m)
    assert [r["smooth"] for r in record] == ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                                            "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm"]
    # block 0's norms see the embeddings: s_j = sqrt(max_j - min_j) / sqrt(2 max_i |W_ij|) by hand (alpha 0.5)
    for key, norm, names in (("in", "input_layernorm", ("q_proj", "k_proj", "v_proj")),
                             ("post", "post_attention_layernorm", ("gate_proj", "up_proj"))):
        y = torch.cat([o.reshape(-1, o.shape[-1]) for o in norm_out[key]]).detach()
        act = y.amax(0) - y.amin(0)
        parent = blk.self_attn if key == "in" else blk.mlp
        w = 2.0 * torch.stack([getattr(parent, n).weight.detach().abs().amax(0) for n in names]).amax(0)
        s = (act.pow(0.5) / w.pow(0.5)).clamp(min=1e-5)
        assert float(s.max()) > 3 * float(s.min())  # the outlier channel gets a large scale
        assert torch.equal(getattr(m.model.layers[0], norm).weight, getattr(blk, norm).weight / s)
        new_parent = m.model.layers[0].self_attn if key == "in" else m.model.layers[0].mlp
        for n in names:
            assert torch.equal(getattr(new_parent, n).weight, getattr(parent, n).weight * s[None, :])
    with torch.no_grad():  # scale equivalence: the same function to fp32 rounding
        a, b = m(input_ids=HELD_OUT).logits, ref(input_ids=HELD_OUT).logits
    assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())
    assert all(r["act_range_max_after"] < r["act_range_max_before"] for r in record)


def test_int8_levels_static_input_scales_and_kv_ranges_are_hand_computed():
    m = llama()
    ref = copy.deepcopy(m)
    rep = quantize(m, "rtn", 8, -1, sym=True, scale_dtype="float32", calib=IDS, show_progress=False,
                   activations="static", kv_cache=True)
    layers = {n: q for n, q in rep.quantized.items() if not isinstance(q, KVRange)}
    assert len(layers) == 14 and rep.as_dict()["activations"]["inputs"] == "static"
    seen = _inputs(ref, list(layers))
    mods, refmods = dict(m.named_modules()), dict(ref.named_modules())
    for n, q in layers.items():
        w = refmods[n].weight.detach()
        assert torch.equal(q.scales.float(), w.abs().amax(1, keepdim=True) / 127.5)  # CT: max|w| / 127.5
        codes = q.codes.long() - 128
        assert int(codes.min()) >= -128 and int(codes.max()) <= 127 and int(codes.abs().max()) >= 127
        assert torch.equal(mods[n].weight, (q.scales.float() * codes.float()))
        assert torch.equal(q.input_absmax, max(x.abs().max() for x in seen[n]))  # static: max |x| over the set
    # the KV ranges: keys after RoPE and values, as the attention hands them to its cache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    for i, layer in enumerate(ref.model.layers):
        att, got = layer.self_attn, rep.quantized[f"model.layers.{i}.self_attn"]
        ks, vs, cs = [], [], []
        hooks = [att.k_proj.register_forward_hook(lambda mod, a, o: ks.append(o)),
                 att.v_proj.register_forward_hook(lambda mod, a, o: vs.append(o)),
                 att.register_forward_pre_hook(lambda mod, a, k: cs.append(k["position_embeddings"]), with_kwargs=True)]
        with torch.no_grad():
            for b in to_batches(IDS):
                ref(**b)
        for h in hooks:
            h.remove()
        kmax = 0.0
        for k, (cos, sin) in zip(ks, cs):
            k = k.view(*k.shape[:2], -1, att.head_dim).transpose(1, 2)
            kmax = max(kmax, float(apply_rotary_pos_emb(k, k, cos, sin)[1].abs().max()))
        assert float(got.k_absmax) == pytest.approx(kmax, rel=1e-6)
        assert float(got.v_absmax) == pytest.approx(max(float(v.abs().max()) for v in vs), rel=1e-6)
        assert float(got.k_absmax) != pytest.approx(max(float(k.abs().max()) for k in ks), rel=1e-3)  # RoPE counts


def test_observers():
    mins = [torch.tensor(-1.0), torch.tensor(-3.0), torch.tensor(-2.0)]
    maxs = [torch.tensor(2.0), torch.tensor(1.0), torch.tensor(4.0)]
    assert float(observed_absmax(mins, maxs)) == 4.0
    lo, hi = -1.0, 2.0  # llm-compressor's moving average, constant 0.01
    for a, b in ((-3.0, 1.0), (-2.0, 4.0)):
        lo, hi = lo * 0.99 + a * 0.01, hi * 0.99 + b * 0.01
    assert float(observed_absmax(mins, maxs, "minmax")) == pytest.approx(max(-lo, hi), rel=1e-6)


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_fp8_rounding_equals_compressed_tensors(strategy):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    W = torch.randn(48, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    W[3] = 0.0  # a dead row gets a tiny scale, not a division by zero
    q = fp8_quantize(W, strategy)
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy)
    amax = W.abs().amax(1, keepdim=True) if strategy == "channel" else W.abs().amax().reshape(1, 1)
    scale, zp = calculate_qparams(-amax, amax, args)
    assert torch.equal(q.scales, scale.reshape(q.scales.shape)) and q.codes.dtype == FP8
    assert torch.equal(q.scales[0 if strategy == "tensor" else 5], amax[0 if strategy == "tensor" else 5] / 448)
    assert torch.equal(q.dequantize(), fake_quantize(W, scale, zp, args))
    assert float(q.codes.float().abs().max()) == 448.0


@pytest.mark.parametrize("kind", ["int", "float"])
def test_dynamic_per_token_activations_equal_compressed_tensors(kind):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1))
    x[0, 3, 5] = 40.0  # an outlier only changes its own token's scale
    args = QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="token", dynamic=True)
    s, zp = compute_dynamic_scales_and_zp(x, args, module=None)
    got = fake_quantize_tokens(x, kind)
    assert torch.equal(got, fake_quantize(x, s, zp, args))
    assert torch.equal(got[1], fake_quantize_tokens(x[1:], kind)[0])


def _ct_write(model, rep, src):
    ck = open_checkpoint(src)
    return deploy.to_compressed_tensors(rep.quantized, model, ck, rep.act)


def test_written_config_and_tensors_are_llm_compressors(tmp_path):
    src = tmp_path / "src"
    save_tiny(src, hidden=64, inter=128, layers=2)
    for method, kw, want, scheme in (("smoothquant", dict(activations="dynamic"), LC_W8A8, "W8A8"),
                                     ("fp8", dict(activations="dynamic", kv_cache=True), LC_FP8_DYNAMIC,
                                      "FP8_DYNAMIC+KV_FP8")):
        m = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        rep = quantize(m, method, 8, -1, sym=True, scale_dtype="float32", calib=IDS, show_progress=False, **kw)
        tensors, config, summary = _ct_write(m, rep, src)
        qc = config["quantization_config"]
        group = {k: ({a: b for a, b in v.items() if b is not None and a not in ("observer", "observer_kwargs")}
                     if isinstance(v, dict) else v) for k, v in qc["config_groups"]["group_0"].items()}
        assert group == want and qc["format"] == want["format"] and qc["ignore"] == ["lm_head"]
        assert qc["quantization_status"] == "compressed" and summary["scheme"] == scheme
        kv = qc["kv_cache_scheme"]
        assert ({a: b for a, b in kv.items() if b is not None and a not in ("observer", "observer_kwargs")} == LC_KV
                if "KV" in scheme else kv is None)
        p = "model.layers.0.self_attn"
        names = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items() if n.startswith(p + ".")}
        wdt = torch.int8 if method == "smoothquant" else FP8
        want_names = {f"{p}.{x}.weight": (wdt, s) for x, s in (("q_proj", (64, 64)), ("k_proj", (32, 64)),
                                                                ("v_proj", (32, 64)), ("o_proj", (64, 64)))}
        want_names.update({f"{p}.{x}.weight_scale": (torch.float32, (s[0], 1))
                           for x, s in (("q_proj", (64,)), ("k_proj", (32,)), ("v_proj", (32,)), ("o_proj", (64,)))})
        if "KV" in scheme:
            want_names.update({f"{p}.k_scale": (torch.float32, (1,)), f"{p}.v_scale": (torch.float32, (1,))})
            r = rep.quantized[p]
            assert torch.equal(tensors[f"{p}.k_scale"], (r.k_absmax / 448).reshape(1))
        assert names == want_names


@pytest.mark.parametrize("scheme", ["W8A8_STATIC", "FP8"])
def test_round_trip_reader_transformers_and_sequential(tmp_path, scheme):
    src = tmp_path / "src"
    save_tiny(src, hidden=64, inter=128, layers=2)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{(i * 7) % 127 + 1}" for i in range(2000)))
    method, params = ("smoothquant", {}) if scheme == "W8A8_STATIC" else ("fp8", {"strategy": "tensor"})
    kw = dict(calib=str(calib), nsamples=4, seqlen=16, no_eval=True, params=params, activations="static",
              kv_cache=True, force=True)
    rep, result = quantize_job(src, tmp_path / "whole", method, 8, -1, sequential=False, **kw)
    quantize_job(src, tmp_path / "seq", method, 8, -1, sequential=True, **kw)
    assert result["written_as"] == f"compressed-tensors {scheme}+KV_FP8"
    with open_checkpoint(tmp_path / "whole", decode=False) as a, open_checkpoint(tmp_path / "seq", decode=False) as b:
        assert sorted(a.names()) == sorted(b.names())
        for n in a.names():  # sequential == whole model, every stored tensor bit for bit
            x, y = a.get(n), b.get(n)
            assert torch.equal(x.view(torch.uint8) if x.dtype == FP8 else x, y.view(torch.uint8) if y.dtype == FP8
                               else y), n
        assert a.get("model.layers.1.mlp.up_proj.input_scale").shape == (1,)
    # the same run in memory: weightlab's reader gives its dense weights, transformers its W8A8 forward
    from weightlab.io.hf import load_tokenizer

    fake = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    rq = quantize(fake, method, 8, -1, sym=True, calib=str(calib), tokenizer=load_tokenizer(src), nsamples=4,
                  seqlen=16, show_progress=False, activations="static", kv_cache=True, scale_dtype="float32", **params)
    with open_checkpoint(tmp_path / "whole") as ck:
        sd = fake.state_dict()
        for n in ck.names():
            assert torch.equal(ck.get(n), sd[n].to(ck.info(n).dtype)), n
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "whole", dtype=torch.float32).eval()
    cfg = json.loads((tmp_path / "whole" / "config.json").read_text())["quantization_config"]
    assert cfg["config_groups"]["group_0"]["input_activations"]["strategy"] == "tensor"
    # transformers serves the activations' fake quantization on the CPU but not the KV cache's (it reports
    # k_scale/v_scale as unexpected keys; vLLM reads them), so the reference leaves the KV cache out
    layers_only = {n: q for n, q in rq.quantized.items() if not isinstance(q, KVRange)}
    with torch.no_grad(), fake_quant(fake, layers_only, dataclasses.replace(rq.act, kv_cache=False)):
        want = fake(input_ids=HELD_OUT[:, :16]).logits
    with torch.no_grad():
        got = loaded(input_ids=HELD_OUT[:, :16]).logits
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_refusals(tmp_path, capsys):
    m = llama(layers=1)
    with pytest.raises(ConfigError, match="8-bit"):
        quantize(m, "rtn", 4, -1, calib=IDS, activations="dynamic")
    with pytest.raises(ConfigError, match="activations must be"):
        quantize(m, "rtn", 8, -1, calib=IDS, activations="per-token")
    with pytest.raises(ConfigError, match="group-size -1"):
        quantize(m, "fp8", 8, 128)
    with pytest.raises(ConfigError, match="group-size -1"):
        deploy.check_request("fp8", 8, 128)
    src = tmp_path / "src"
    save_tiny(src, hidden=64, inter=128, layers=1)
    with pytest.raises(ConfigError, match="compressed-tensors"):
        quantize_job(src, tmp_path / "o", "rtn", 8, -1, fmt="hf", activations="static", no_eval=True)
    from weightlab.cli import main

    assert main(["quantize", str(src), "--scheme", "W8A8", "-b", "4", "-o", str(tmp_path / "o2")]) == 1
    assert "8-bit weights, not 4" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,scale_dtype", [(8, "float32"), (8, "float16"), (4, "bfloat16")])
def test_float32_channel_rtn_equals_float64_rtn(dtype, bits, scale_dtype):
    """SmoothQuant's per-channel RTN (float32 quotient: rtn's float32 path, no float64 copies) gives the float64
    path's codes, scales and zeros bit for bit, with the largest |w| of rows on exact half steps (where the
    quotient's last bit picks the level), all-zero rows and a row of one sign; and the per-channel dequantize
    broadcasts exactly what the gathered product gives."""
    from weightlab.tensor.quant import rtn

    g = torch.Generator().manual_seed(bits)
    W = (torch.randn(64, 96, generator=g) * torch.logspace(-3, 1, 64)[:, None]).to(dtype)
    half = 2 ** (bits - 1) - 0.5
    W[5] = torch.arange(96, dtype=torch.float64).to(dtype) / 95 * 3.0  # ties: k * max / half for integer k
    W[6] = (torch.arange(96) - 48).to(dtype) * (1.0 / half)
    W[7] = 0.0
    W[8] = -W[8].abs()
    want = rtn(W.double(), bits, -1, True, scale_dtype, quotient_dtype=torch.float32)  # float64: the general path
    got = rtn(W, bits, -1, True, scale_dtype, quotient_dtype=torch.float32)
    for f in ("codes", "scales", "zeros", "g_idx"):
        a, b = getattr(got, f), getattr(want, f)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f
    assert (got.bits, got.group_size, got.sym) == (want.bits, want.group_size, want.sym)
    g_idx = want.g_idx.long()
    gathered = want.scales.float()[:, g_idx] * (want.codes.float() - want.zeros.float()[:, g_idx])
    assert torch.equal(got.dequantize(rows=16), gathered)
