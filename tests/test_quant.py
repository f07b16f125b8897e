"""Quantizers (RTN, GPTQ, PB-LLM, StatsQ), EoRA and the packed format, proved on synthetic layers."""
import copy

import pytest
import torch

import weightlab.compress.compensate  # noqa: F401  (register)
import weightlab.compress.gptq  # noqa: F401
import weightlab.compress.pbllm as pb
import weightlab.compress.rtn  # noqa: F401
import weightlab.compress.statsq as sq
from weightlab.compress.compensate import compensate, load_peft_adapter, save_peft_adapter
from weightlab.compress.packed import load_packed, pack_bits, pack_layer, unpack_bits, unpack_layer
from weightlab.compress.quantize import quantize, save_quantized_packed
from weightlab.tensor.eora import eora, svd_lowrank, weighted_error
from weightlab.tensor.gptq import gptq
from weightlab.tensor.quant import rtn


def synthetic(dout=64, din=256, n=4096, seed=0):
    """The notes' layer: X = Z A with random A and 8 outlier features x10."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(din, din, generator=g) / din ** 0.5
    X = torch.randn(n, din, generator=g) @ A
    X[:, torch.randperm(din, generator=g)[:8]] *= 10
    W = torch.randn(dout, din, generator=g)
    H = 2 / n * X.T.double() @ X.double()
    return W, X, H.float()


def out_err(W, Wq, X):
    return float(((W - Wq) @ X.T).pow(2).sum() / (W @ X.T).pow(2).sum())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gs", [-1, 64, 100])  # 100: partial last group of 56 columns
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_levels_per_group(bits, gs, sym):
    W, _, _ = synthetic()
    q = rtn(W, bits, gs, sym)
    Wq = q.dequantize()
    cols = W.shape[1]
    starts = range(0, cols, gs) if gs > 0 else [0]
    for s in starts:
        blk = Wq[:, s:s + gs] if gs > 0 else Wq
        for r in range(0, W.shape[0], 7):
            assert blk[r].unique().numel() <= 2 ** bits
    assert int(q.codes.max()) <= 2 ** bits - 1
    assert q.scales.shape[1] == (-(-cols // gs) if gs > 0 else 1)
    # within one step (half a step, plus zero-point rounding and fp16 scale rounding at the edges)
    step = q.scales.float()[:, q.g_idx.long()]
    assert ((W - Wq).abs() <= step + 1e-6).all()


def test_rtn_zero_row_and_zero_exact():
    W = torch.randn(4, 16)
    W[1] = 0
    q = rtn(W, 4, -1)
    Wq = q.dequantize()
    assert torch.equal(Wq[1], torch.zeros(16))


def test_gptq_equals_rtn_when_hessian_is_identity():
    W, _, _ = synthetic()
    for gs in (-1, 64):
        g, _ = gptq(W, torch.eye(W.shape[1]), 4, gs, blocksize=W.shape[1])
        r = rtn(W, 4, gs)
        assert torch.equal(g.dequantize(), r.dequantize())


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    W, X, H = synthetic()
    e_rtn = out_err(W, rtn(W, bits).dequantize(), X)
    g, loss = gptq(W, H, bits)
    e_gptq = out_err(W, g.dequantize(), X)
    assert e_gptq < 0.6 * e_rtn, (e_gptq, e_rtn)
    # with act-order this layer reproduces the notes: 4-bit RTN 0.0117 vs GPTQ 0.0024, 3-bit 0.055 vs 0.012
    e_act = out_err(W, gptq(W, H, bits, act_order=True)[0].dequantize(), X)
    assert e_act < 0.3 * e_rtn, (e_act, e_rtn)
    for kw in ({"group_size": 64}, {"group_size": 64, "act_order": True}, {"group_size": 64, "static_groups": True,
                                                                           "act_order": True}, {"act_order": True}):
        gq, _ = gptq(W, H, bits, **kw)
        assert out_err(W, gq.dequantize(), X) < e_rtn
        for r in range(0, 64, 9):  # still at most 2^b levels per (row, group)
            for gi in gq.g_idx.unique():
                assert gq.dequantize()[r, gq.g_idx == gi].unique().numel() <= 2 ** bits


def test_gptq_loss_is_the_weighted_error():
    W, _, H = synthetic(dout=16, din=64, n=512)
    g, loss = gptq(W, H, 4, percdamp=0.01)
    Hd = H.double() + 0.01 * H.double().diagonal().mean() * torch.eye(64, dtype=torch.float64)
    E = (W.double() - g.dequantize().double())
    assert loss == pytest.approx(0.5 * float(torch.trace(E @ Hd @ E.T)), rel=1e-4)


def test_pbllm_optimal_scale_and_exact_fraction():
    w = torch.randn(10000)
    a = pb.optimal_binary_scale(w)

    def mse(s):
        return float(((w - s * torch.sign(w)) ** 2).mean())

    assert mse(a) < mse(0.9 * a) and mse(a) < mse(1.1 * a)
    W, _, H = synthetic()
    for rho in (0.0, 0.05, 0.1, 0.5):
        q = pb.pbllm_ptq(W, H, rho)
        assert int(q.salient.sum()) == round(rho * W.numel())
        q2 = pb.pbllm_ptq(W, H, rho, score="hessian")
        assert int(q2.salient.sum()) == round(rho * W.numel())


def test_pbllm_rho_one_is_8bit_gptq():
    W, _, H = synthetic()
    p = pb.pbllm_ptq(W, H, 1.0)
    g, _ = gptq(W, H, 8, -1)
    assert torch.equal(p.dequantize(), g.dequantize())


def test_pbllm_gptq_beats_plain_rounding():
    W, X, H = synthetic()
    e_g = out_err(W, pb.pbllm_ptq(W, H, 0.1).dequantize(), X)
    e_r = out_err(W, pb.pbllm_ptq(W, H, 0.1, use_gptq=False).dequantize(), X)
    assert e_g < e_r
    # the two rho=0 paths differ (PTQ: per-row mu + alpha sign(w - mu); QAT: per-tensor alpha sign(w))
    ptq = pb.pbllm_ptq(W, None, 0.0, use_gptq=False, scale_dtype="float32").dequantize()
    qat = W.abs().mean() * torch.sign(W)
    assert not torch.allclose(ptq, qat)


def test_pbllm_qat_freezes_salient():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    fr = pb.prepare_pbllm_qat(m, rho=0.1)
    before = [p.detach().clone() for p in fr.params]
    opt = torch.optim.AdamW([p for p in m.parameters()], lr=1e-2, weight_decay=0.1)
    m(torch.randn(8, 32)).pow(2).mean().backward()
    fr.before_step()
    opt.step()
    fr.after_step()
    for p, b, in zip(fr.params, before):
        sal = fr.mask_fn(p)
        assert int(sal.sum()) == 2 * round(0.05 * p.numel())
        assert torch.equal(p[sal], b[sal]) and not torch.equal(p[~sal], b[~sal])
    w = m[0].weight  # binarized entries take one magnitude per tensor
    assert w[~fr.mask_fn(fr.params[0])].abs().unique().numel() == 1


def test_statsq_grid_and_ste():
    W = torch.randn(32, 64, requires_grad=True)
    for bits in (2, 3, 4):
        Q = sq.statsq_fake(W, bits)
        s = 2 * W.detach().abs().mean(1, keepdim=True)
        n = 2 ** (bits - 1)
        k = Q.detach() / s * n - 0.5
        assert torch.allclose(k, k.round(), atol=1e-4)  # half-integer levels s (k + 1/2) / n
        for r in range(32):
            assert Q[r].unique().numel() <= 2 ** bits
        assert (Q.detach() != 0).all()
    g = torch.randn(32, 64)
    sq.statsq_fake(W, 2).backward(g)
    assert torch.equal(W.grad, g)


def test_cga_frozen_weights_unchanged_by_adamw():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
    layers = sq.prepare_statsq_qat(m, bits=2)
    cga = sq.CGA(layers.values(), bits=2, br=0.1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    before = [p.detach().clone() for p in cga.params]
    m(torch.randn(16, 32)).pow(2).mean().backward()
    frac = cga.before_step()
    opt.step()
    cga.after_step()
    assert 0 < frac < 1
    changed = False
    for p, b in zip(cga.params, before):
        fz = ~sq.low_confidence(b, 2, 0.1)
        assert torch.equal(p[fz], b[fz])
        changed |= not torch.equal(p[~fz], b[~fz])
    assert changed
    W = torch.randn(16, 16)
    assert not sq.low_confidence(W, 2, 0.0).any() and sq.low_confidence(W, 2, 0.5)[(W / (2 * W.abs().mean(1, keepdim=True))).abs() < 0.99].all()


def test_eora_is_the_theoretical_minimum_and_beats_svd():
    W, X, H = synthetic()
    Wc = rtn(W, 2).dequantize()
    dW = W - Wc
    C = X.T.double() @ X.double()
    base = weighted_error(dW, C)
    for r in (8, 32):
        B, A, S = eora(dW, C, r, return_spectrum=True)
        e = weighted_error(dW - B @ A, C)
        assert e == pytest.approx(float((S[r:] ** 2).sum()), rel=1e-4)
        Bs, As = svd_lowrank(dW, r)
        e_svd = weighted_error(dW - Bs @ As, C)
        assert e < 0.5 * e_svd < base  # notes: r=8 0.227 (SVD) vs 0.060 (EoRA)
        # any other rank-r correction is no better (random perturbations of the optimum)
        for _ in range(3):
            assert weighted_error(dW - (B + 1e-2 * torch.randn_like(B)) @ A, C) >= e
    B, A = eora(dW, H, 64)  # r = rank(dW) = dout recovers W; scale of C is irrelevant
    assert torch.allclose(Wc + B @ A, W, atol=1e-3)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
def test_bit_packing_roundtrip(bits):
    c = torch.randint(0, 2 ** bits, (7, 37), dtype=torch.uint8)
    p = pack_bits(c, bits)
    assert p.shape == (7, -(-37 * bits // 8))
    assert torch.equal(unpack_bits(p, bits, 37), c)


def test_pack_layer_roundtrip_all_schemes():
    W, _, H = synthetic(dout=24, din=80, n=512)
    layers = [rtn(W, 3, 32), gptq(W, H, 4, 32, act_order=True)[0], pb.pbllm_ptq(W, H, 0.1)]
    s = sq.statsq(type("C", (), {"weight": W, "bits": 2, "scale_dtype": "float16"})())
    for q in layers + [s]:
        t, meta = pack_layer(q)
        back = unpack_layer(t, meta)
        assert torch.equal(back.dequantize(), q.dequantize())
    bpw = pack_layer(rtn(W, 4, 64))[1]["bits_per_weight"]
    assert bpw == 4 + (2 * 16 + 2 * 4) / 80  # codes + 2 groups (one partial) x (fp16 scale + 4-bit zero) per row
    # sign + salient bitmap + 10% x 8 bits + per row (mu, alpha, scale8 fp16, zero8 8 bits) / 80 columns
    assert pack_layer(layers[2])[1]["bits_per_weight"] == pytest.approx(2 + 0.8 + 56 / 80)


transformers = pytest.importorskip("transformers")


def _llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _ids(n=8, seqlen=24, seed=0):
    return torch.randint(0, 96, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _loss(m, ids):
    with torch.no_grad():
        return float(m(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("method,kw", [("rtn", {}), ("gptq", {}), ("gptq", {"act_order": True}), ("pbllm", {}),
                                       ("statsq", {})])
def test_quantize_driver_tiny_llama(method, kw, tmp_path):
    m = _llama()
    dense = copy.deepcopy(m)
    rep = quantize(m, method, None if method == "pbllm" else 4, 48, calib=_ids(), show_progress=False, **kw)
    assert len(rep.layers) == 14 and rep.bits_per_weight > 1
    for n, q in rep.quantized.items():
        mod = dict(m.named_modules())[n]
        assert torch.equal(mod.weight.detach(), q.dequantize().to(mod.weight.dtype))
    assert rep.as_dict()["rel_weight_error"] > 0
    # packed folder loads back exactly
    from weightlab.io.writer import save_state_dict
    from weightlab.io.reader import open_checkpoint

    src = tmp_path / "dense"
    save_state_dict(dense.state_dict(), src)
    with open_checkpoint(src) as ck:
        summ = save_quantized_packed(tmp_path / "packed", rep, m, ck)
    sd = load_packed(tmp_path / "packed")
    msd = m.state_dict()
    assert set(sd) == set(msd) - {k for k in msd if k not in dense.state_dict()} or set(sd) <= set(msd)
    for k, v in sd.items():
        assert torch.equal(v, msd[k]), k
    assert summ["bits_per_weight"] == pytest.approx(rep.bits_per_weight, rel=1e-3)


def test_gptq_beats_rtn_on_tiny_llama_outputs():
    ids, test = _ids(16), _ids(8, seed=1)
    with torch.no_grad():
        dense = _llama()(input_ids=test).logits
    res = {}
    for method in ("rtn", "gptq"):
        m = _llama()
        quantize(m, method, 3, -1, calib=ids, show_progress=False)
        with torch.no_grad():
            res[method] = float((m(input_ids=test).logits - dense).pow(2).mean())
    assert res["gptq"] < res["rtn"], res


def test_compensate_eora_and_svd_tiny_llama(tmp_path):
    ids = _ids(16)
    orig = _llama()
    errs = {}
    for method in ("svd", "eora"):
        m = _llama()
        quantize(m, "rtn", 2, -1, show_progress=False)
        rep = compensate(m, orig, method, rank=4, calib=ids, show_progress=False)
        errs[method] = rep
        for r in rep.layers:
            assert r["rel_weight_error_after"] <= r["rel_weight_error_before"] + 1e-6 or method == "eora"
    ratio = errs["eora"].as_dict()["input_weighted_error_ratio"]
    assert ratio < 1
    # adapters (merge=False) leave the model unchanged and round-trip through the PEFT format
    m = _llama()
    quantize(m, "rtn", 2, -1, show_progress=False)
    w0 = {k: v.clone() for k, v in m.state_dict().items()}
    rep = compensate(m, orig, "eora", rank=4, merge=False, calib=ids, show_progress=False)
    assert all(torch.equal(w0[k], v) for k, v in m.state_dict().items())
    save_peft_adapter(tmp_path / "ad", rep.adapters, rank=4)
    back = load_peft_adapter(tmp_path / "ad")
    for n, (B, A) in rep.adapters.items():
        assert torch.equal(back[n][0], B) and torch.equal(back[n][1], A)


def test_solver_precision_float32_and_in_place_factor():
    """float32 solves (the reference code's precision) track the float64 reference; the in-place
    factorization is the out-of-place one bit for bit."""
    from weightlab.tensor.gptq import gptq as gptq_solve
    from weightlab.tensor.obs import damped_hessian, solver_dtype, sparsegpt, upper_inverse_factor

    g = torch.Generator().manual_seed(3)
    X = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)
    H, W = X.T @ X * (2 / 512), torch.randn(48, 64, generator=g)
    _, Hd = damped_hessian(H, W)
    assert torch.equal(upper_inverse_factor(Hd.clone(), inplace=True), upper_inverse_factor(Hd))
    q64, l64 = gptq_solve(W, H, 4, 32, dtype=torch.float64)
    q32, l32 = gptq_solve(W, H, 4, 32, dtype=torch.float32)
    assert (q64.codes == q32.codes).float().mean() > 0.99 and abs(l32 - l64) / l64 < 1e-3
    w64, m64, _ = sparsegpt(W, H, 0.5, dtype=torch.float64)
    w32, m32, _ = sparsegpt(W, H, 0.5, dtype=torch.float32)
    assert (m64 == m32).float().mean() > 0.99 and torch.allclose(w64, w32, atol=1e-3)
    assert solver_dtype("auto", torch.device("cpu")) == torch.float64
    assert solver_dtype("auto", torch.device("cuda")) == torch.float32


def test_bits_per_weight_without_packing_equals_the_packed_bytes():
    from weightlab.compress.packed import bits_per_weight, pack_layer
    from weightlab.tensor.gptq import gptq as gptq_solve
    from weightlab.tensor.quant import rtn as rtn_q

    g = torch.Generator().manual_seed(3)
    for shape, bits, group in (((64, 100), 3, 32), ((33, 128), 4, -1), ((8, 64), 8, 16), ((5, 7), 2, 3)):
        q = rtn_q(torch.randn(*shape, generator=g), bits, group, sym=False)
        assert bits_per_weight(q) == pack_layer(q)[1]["bits_per_weight"]
    X = torch.randn(200, 64, generator=g, dtype=torch.float64)
    q, _ = gptq_solve(torch.randn(16, 64, generator=g), X.T @ X, 4, 16, act_order=True)
    assert not q.trivial_g_idx and bits_per_weight(q) == pack_layer(q)[1]["bits_per_weight"]
