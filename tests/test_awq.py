"""AWQ (compress/awq.py) on tiny Llamas: the fold is exact, AWQ beats RTN on an outlier channel, the chosen
ratio is the grid minimum (recomputed here from llm-compressor's formulas), sequential == whole model, and
the compressed-tensors output loads with transformers."""
import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import weightlab.compress.awq as A  # noqa: E402
from weightlab.compress import deploy  # noqa: E402
from weightlab.compress.prune import to_batches  # noqa: E402
from weightlab.compress.quantize import BlockContext, quantize  # noqa: E402
from weightlab.compress.sequential import run_sequential  # noqa: E402
from weightlab.engine.calibration import layerwise  # noqa: E402
from weightlab.errors import ConfigError  # noqa: E402
from weightlab.io.reader import open_checkpoint  # noqa: E402
from weightlab.registry import get_method  # noqa: E402
from weightlab.tensor.quant import rtn  # noqa: E402

from _tiny_llama import tiny_llama  # noqa: E402

IDS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
HELD_OUT = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))
OUTLIER = 5  # an input channel of both norms made 30x larger: large activations in one channel of q/k/v and gate/up


@pytest.fixture(autouse=True)
def _threads(one_thread):  # one thread: the same kernels (and sums) in the whole-model and sequential paths
    yield


def llama(kv_heads=2, layers=2, outlier=True, seed=0):
    """A tiny Llama (4 heads, hidden 64) with N(0, 0.05) matrices, norms in [0.5, 1.5] and an outlier channel."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=128,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.05)
            else:
                p.uniform_(0.5, 1.5)
        if outlier:
            for layer in m.model.layers:
                layer.input_layernorm.weight[OUTLIER] *= 30
                layer.post_attention_layernorm.weight[OUTLIER] *= 30
    return m


def awq_cfg(**params):
    return get_method("compress", "awq").make_config(params)


def smooth_only(model, bits=3, group=32, hessian=False, on_block=None, **params):
    """AWQ's block step alone through the engine (no layer is quantized); returns the records."""
    cfg, record = awq_cfg(**params), []

    def step(run, layers, stats):
        A.smooth_block(BlockContext(run, layers, stats, bits, group, False, "float16", cfg, record))

    layerwise(model, to_batches(IDS), on_block or (lambda i, name, ls, st: None), hessian=hessian, block_step=step)
    return record


def _close(a, b, tol=1e-5):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("kv_heads", [4, 2])  # 4: v_proj -> o_proj is smoothed too; 2 (GQA): it is skipped
def test_fold_alone_leaves_every_block_output_unchanged(kv_heads):
    m = llama(kv_heads)
    ref = copy.deepcopy(m)
    record = smooth_only(m)
    done = [r for r in record if "skipped" not in r]
    assert len(done) == (4 if kv_heads == 4 else 3) * 2
    if kv_heads == 2:
        skipped = [r for r in record if "skipped" in r]
        assert [r["smooth"] for r in skipped] == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
        assert "grouped-query" in skipped[0]["skipped"]
    # the fold changed the weights (the outlier makes AWQ pick a ratio > 0) ...
    assert any(r["ratio"] > 0 for r in done)
    assert not torch.equal(m.model.layers[0].input_layernorm.weight, ref.model.layers[0].input_layernorm.weight)
    assert not torch.equal(m.model.layers[0].self_attn.q_proj.weight, ref.model.layers[0].self_attn.q_proj.weight)
    # ... and not the function: every block's output, and the logits, to 1e-5
    with torch.no_grad():
        got = m(input_ids=HELD_OUT, output_hidden_states=True)
        want = ref(input_ids=HELD_OUT, output_hidden_states=True)
    for a, b in zip(got.hidden_states, want.hidden_states):
        assert _close(a, b)
    assert _close(got.logits, want.logits)
    # the grid includes s = 1 (plain RTN), so no mapping ends worse than RTN on the calibration data
    assert all(r["best_error"] <= r["initial_error"] for r in done)


def test_gptq_followup_sees_the_hessian_of_the_smoothed_inputs():
    m = llama()
    transformed, collected = {}, {}
    smooth_only(m, hessian=True, on_block=lambda i, name, ls, st: transformed.update({n: st[n].H for n in st}))
    layerwise(m, to_batches(IDS), lambda i, name, ls, st: collected.update({n: st[n].H for n in st}), hessian=True)
    assert transformed.keys() == collected.keys() and len(collected) == 14
    for n, h in collected.items():  # without the transform, q/k/v/gate/up/down would keep the unsmoothed H
        assert torch.allclose(transformed[n], h, rtol=1e-4, atol=1e-5 * float(h.abs().max())), n


def test_awq_beats_rtn_on_an_outlier_channel():
    m = llama()
    with torch.no_grad():
        want = m(input_ids=HELD_OUT).logits
    err = {}
    for method, params in (("rtn", {}), ("awq", {}), ("awq", {"quantizer": "gptq"})):
        q = copy.deepcopy(m)
        rep = quantize(q, method, 3, 32, calib=IDS, show_progress=False, **params)
        with torch.no_grad():
            err[method + params.get("quantizer", "")] = float((q(input_ids=HELD_OUT).logits - want).pow(2).mean())
        if method == "awq":
            assert rep.as_dict()["transforms"] == rep.transforms and len(rep.layers) == 14
    assert err["awq"] < 0.7 * err["rtn"], err
    assert err["awqgptq"] < err["rtn"], err


def _parent_inputs(model, parent, first):
    kept, xs = [], []
    h1 = parent.register_forward_pre_hook(lambda mod, a, k: kept.append((a, k)), with_kwargs=True)
    h2 = first.register_forward_hook(lambda mod, a, o: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in to_batches(IDS):
            model(**b)
    h1.remove()
    h2.remove()
    # mean |x| over all tokens, summed per batch and across batches in float32 as llm-compressor's hook does
    total = torch.zeros(xs[0].shape[-1])
    for x in xs:
        total += x.abs().float().sum(0)
    return kept, total / torch.tensor(sum(x.shape[0] for x in xs))


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def test_chosen_ratio_is_the_grid_minimum():
    """Block 0 (its inputs are the embeddings): llm-compressor's loss recomputed on its 20-point grid."""
    m = llama()
    ref = copy.deepcopy(m)
    rep = quantize(m, "awq", 3, 32, calib=IDS, show_progress=False)
    recs = {r["parent"]: r for r in rep.transforms if "skipped" not in r}
    blk = ref.model.layers[0]
    grid = [(0.0, False)] + [(i / 18, True) for i in range(19)]  # duo_scaling=True, n_grid=20
    assert A.grid(True, 20) == grid
    # both parents' inputs come from one pass of the unsmoothed block, as here: the losses agree to rounding
    for parent, names in ((blk.self_attn, ("q_proj", "k_proj", "v_proj")), (blk.mlp, ("gate_proj", "up_proj"))):
        rec = recs[f"model.layers.0.{'self_attn' if parent is blk.self_attn else 'mlp'}"]
        kept, x_mean = _parent_inputs(ref, parent, getattr(parent, names[0]))
        W = torch.cat([getattr(parent, n).weight.detach() for n in names])
        g = W.abs().reshape(-1, 32)
        w_mean = (g / (g.amax(1, keepdim=True) + 1e-6)).reshape(W.shape).double().mean(0)
        with torch.no_grad():
            fp = [_out(parent(*a, **k)) for a, k in kept]
        losses = []
        for ratio, duo in grid:  # llm-compressor's dtypes: x_mean float32, w_mean float64
            s = (x_mean ** ratio / (w_mean ** (1 - ratio) + 1e-4) if duo else x_mean ** ratio).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            p = copy.deepcopy(parent)
            with torch.no_grad():
                for n in names:
                    w = getattr(p, n).weight
                    q = rtn((w.to(s.dtype) * s).float(), 3, 32, False, "float16", torch.float32)  # CT's float32 w/s
                    w.copy_(q.dequantize().to(s.dtype) / s)
                sq = torch.zeros(())  # summed mse_loss per batch, added up in float32
                for (a, k), f in zip(kept, fp):
                    sq += torch.nn.functional.mse_loss(_out(p(*a, **k)), f, reduction="sum")
            losses.append(float(sq / sum(f.numel() for f in fp)))
        assert [e for _, _, e in rec["grid"]] == pytest.approx(losses, rel=1e-6, abs=0)
        best = min(range(len(grid)), key=losses.__getitem__)  # the first minimum, as llm-compressor's strict <
        assert grid.index((rec["ratio"], rec["duo_scaling"])) == best
        assert rec["best_error"] == min(e for _, _, e in rec["grid"]) < rec["initial_error"]


def _digests(folder):
    with open_checkpoint(folder) as ck:
        return {n: ck.get(n).clone() for n in ck.names()}


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_sequential_equals_whole_model(tmp_path, quantizer):
    src = tmp_path / "src"
    tiny_llama(src)
    got = {}
    rep, info = run_sequential("quantize", src, tmp_path / "out", calib=IDS, method="awq", bits=4, group_size=32,
                               quantizer=quantizer, hessian=quantizer == "gptq", data=True,
                               on_block_written=lambda i, name, state, codes: (got.update(codes), state)[1])
    whole = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref = quantize(whole, "awq", 4, 32, calib=IDS, quantizer=quantizer)
    written, sd = _digests(tmp_path / "out"), whole.state_dict()
    for n, t in written.items():  # smoothed norms and quantized weights alike, bit for bit
        assert torch.equal(t, sd[n].to(t.dtype)), n
    assert rep.transforms == ref.transforms and len([r for r in rep.transforms if "skipped" not in r]) == 6
    assert got.keys() == ref.quantized.keys()
    for n, q in ref.quantized.items():
        assert torch.equal(got[n].codes, q.codes) and torch.equal(got[n].scales, q.scales)
    orig = _digests(src)
    assert not torch.equal(written["model.layers.1.post_attention_layernorm.weight"],
                           orig["model.layers.1.post_attention_layernorm.weight"])
    assert torch.equal(written["model.embed_tokens.weight"], orig["model.embed_tokens.weight"])


def test_cli_compressed_tensors_loads_with_transformers(tmp_path, capsys):
    from weightlab.cli import main
    from weightlab.io.hf import load_tokenizer

    from test_deploy_ct import save_tiny

    src, out = tmp_path / "src", tmp_path / "ct"
    save_tiny(src, hidden=64, inter=128, layers=2)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{(i * 7) % 127 + 1}" for i in range(2000)))
    assert main(["quantize", str(src), "-m", "awq", "-b", "4", "-g", "32", "--calib", str(calib), "--nsamples", "4",
                 "--seqlen", "16", "--no-eval", "-o", str(out)]) == 0
    assert "AWQ: 6 mappings smoothed" in capsys.readouterr().out
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert (qc["format"], w["num_bits"], w["group_size"], w["symmetric"]) == ("pack-quantized", 4, 32, True)
    assert len(json.loads((out / "quantize-report.json").read_text())["transforms"]) == 8
    # the same run in memory (whole model): the loaded checkpoint is its fake-quantized model exactly
    fake = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    quantize(fake, "awq", 4, 32, sym=True, calib=str(calib), tokenizer=load_tokenizer(src), nsamples=4, seqlen=16,
             show_progress=False)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = loaded(input_ids=HELD_OUT).logits, fake(input_ids=HELD_OUT).logits
    assert (a - b).abs().max() < 1e-4
    mods, ref = dict(loaded.named_modules()), dict(fake.named_modules())
    assert torch.equal(mods["model.layers.0.input_layernorm"].weight, ref["model.layers.0.input_layernorm"].weight)
    assert torch.equal(mods["model.layers.1.mlp.up_proj"].weight, ref["model.layers.1.mlp.up_proj"].weight)


def test_refusals():
    m = llama(layers=1)
    with pytest.raises(ConfigError, match="quantizer=gptq"):
        quantize(m, "awq", 4, 32, calib=IDS, act_order=True)
    with pytest.raises(ConfigError, match="n_grid"):
        awq_cfg(duo_scaling="both", n_grid=3)
    with pytest.raises(ConfigError, match="static_groups"):
        deploy.check_request("awq", 4, 32, {"quantizer": "gptq", "act_order": True})
    deploy.check_request("awq", 4, 32, {"quantizer": "gptq", "act_order": True, "static_groups": True})
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with pytest.raises(ConfigError, match="none of its mappings"):
        quantize(mlp, "awq", 4, 16, calib=torch.randn(8, 16))
    # mappings by name work on any module tree (ReLU(z / s) = ReLU(z) / s: this fold is exact too)
    rep = quantize(mlp, "awq", 4, 16, calib=torch.randn(8, 16), mappings=[["0", ["2"]]], duo_scaling=False)
    assert [r["parent"] for r in rep.transforms] == ["2"]


def test_float32_quotient_rounds_ties_as_compressed_tensors():
    """The largest |w| of every symmetric group sits on a half step; AWQ's RTN divides as compressed-tensors does."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    W = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64)
    q32 = rtn(W, 4, 64, True, "float32", torch.float32)
    ct = fake_quantize(W, q32.scales.float(), torch.zeros_like(q32.scales, dtype=torch.int8), args)
    assert torch.equal(q32.dequantize(), ct)
    q64 = rtn(W, 4, 64, True, "float32")  # weightlab's plain RTN: the float64 quotient rounds some ties the other way
    assert 0 < int((q64.dequantize() != ct).sum()) <= W.shape[0] * 4  # at most the one tie per group


@pytest.mark.parametrize("shape,group,sym", [((48, 128), 32, True), ((48, 128), 32, False), ((48, 100), 32, True),
                                             ((48, 128), -1, False), ((192, 576), 64, True), ((192, 576), 64, False)])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_grid_search_fake_quantize_is_rtn(shape, group, sym, wdtype):
    """The grid search's vectorized Q(w) equals the final quantizer's RTN bit for bit (also a partial last group,
    16-bit weights, every scale dtype, and 3 or 4 bits: every symmetric group's largest |w| is a rounding tie)."""
    w = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(wdtype)
    w[0, :5] = 0.0  # a zero run and an all-zero group (its range is [-1, 1])
    w[1, :max(group, 1) if group > 0 else shape[1]] = 0.0
    for bits in (3, 4):
        for dt in ("float16", "bfloat16", "float32"):
            want = rtn(w.double(), bits, group, sym, dt, torch.float32).dequantize()  # float64: the general path
            assert torch.equal(A.fake_quantize(w, bits, group, sym, dt), want), (bits, dt)
