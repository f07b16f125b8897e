"""OFQ (Liu et al., ICML 2023): QKR, LSQ, the oscillation counter, StatsQ and CGA on hand-made cases."""
import math

import pytest
import torch
from torch import nn

import weightlab.compress.statsq as sq
from weightlab.compress.lsq import LSQAct, LSQWeight, lsq_fake, prepare_lsq_qat, quantize_inputs
from weightlab.compress.oscillation import LevelTrace, OscillationTracker
from weightlab.compress.qkr import QKRAttention, convert_qkr
from weightlab.errors import ConfigError
from weightlab.registry import REGISTRY

pytestmark = pytest.mark.usefixtures("one_thread")


class Attn(nn.Module):  # timm/DeiT-style attention
    def __init__(self, C=16, H=4, bias=True):
        super().__init__()
        self.num_heads, self.scale = H, (C // H) ** -0.5
        self.qkv, self.proj = nn.Linear(C, 3 * C, bias=bias), nn.Linear(C, C)

    def qk_logits(self, x):
        B, N, C = x.shape
        q, k, _ = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return (q @ k.transpose(-2, -1)) * self.scale

    def forward(self, x):
        B, N, C = x.shape
        v = self.qkv(x)[..., 2 * C:].reshape(B, N, self.num_heads, -1).transpose(1, 2)
        return self.proj((self.qk_logits(x).softmax(-1) @ v).transpose(1, 2).reshape(B, N, C))


def test_qkr_logits_equal_qk_without_bias_and_differ_with_it():
    torch.manual_seed(0)
    a = Attn(bias=True)
    with torch.no_grad():
        a.qkv.bias[:32].zero_()  # q and k biases zero, v bias kept
    x = torch.randn(2, 5, 16)
    r = QKRAttention.from_attention(a)
    assert torch.allclose(r.logits(x), a.qk_logits(x), atol=1e-5, rtol=1e-5)
    assert torch.allclose(r(x), a(x), atol=1e-5)
    assert r.qk_weight().numel() == 4 * 16 ** 2  # H C^2 quantized weights per block (vs 2 C^2)
    with torch.no_grad():
        a.qkv.bias[:32].normal_()
    drop = QKRAttention.from_attention(a)  # the reference: biases dropped, not function-preserving
    assert not torch.allclose(drop.logits(x).softmax(-1), a.qk_logits(x).softmax(-1), atol=1e-3)
    keep = QKRAttention.from_attention(a, qk_bias="keep")  # b_q^T W_k x_j kept: the softmax is unchanged
    assert not torch.allclose(keep.logits(x), a.qk_logits(x), atol=1e-3)  # logits shift per row ...
    assert torch.allclose(keep.logits(x).softmax(-1), a.qk_logits(x).softmax(-1), atol=1e-5)  # ... only
    assert torch.allclose(keep(x), a(x), atol=1e-5)


def test_qkr_quantizes_the_product_with_statsq_and_converts_models():
    torch.manual_seed(1)
    m = nn.Sequential(Attn(), nn.Linear(16, 4))
    names = convert_qkr(m, bits=2)
    assert names == ["0"] and isinstance(m[0], QKRAttention) and m[0].q_bias is None
    r = m[0]
    Wq = r.qk_weight_q().reshape(-1, 16)
    assert torch.equal(Wq, sq.statsq_fake(r.qk_weight().reshape(-1, 16), 2))
    for row in Wq:
        assert row.unique().numel() <= 4
    r.qk_weight_q().sum().backward()  # STE: gradient reaches W_q and W_k through the product
    assert r.q_weight.grad.abs().sum() > 0 and r.k_weight.grad.abs().sum() > 0
    assert "q_weight" not in sq.prepare_statsq_qat(m, 2)  # q/k are not Linear layers: never quantized twice
    with pytest.raises(ConfigError):
        convert_qkr(nn.Sequential(nn.Linear(4, 4)))
    assert REGISTRY.get("compress", "qkr").fn is convert_qkr


def test_qkr_with_activation_quantizers_trains():
    torch.manual_seed(2)
    a = Attn()
    r = QKRAttention.from_attention(a, bits=2, act_bits=4)
    x = torch.randn(3, 6, 16)
    y = r(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.pow(2).mean().backward()
    assert r.qk_act.s.grad is not None and r.p_act.s.grad is not None


def test_lsq_scale_gradient_matches_hand_computation():
    x = torch.tensor([-3.0, -1.2, -0.4, 0.3, 0.6, 1.7, 0.9])
    s = torch.tensor(0.5, requires_grad=True)
    lo, hi, g = -2, 1, 0.25
    y = lsq_fake(x, s, lo, hi, g)
    assert torch.allclose(y, torch.tensor([-1.0, -1.0, -0.5, 0.5, 0.5, 0.5, 0.5]))
    up = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0, -2.0, 1.5])
    y.backward(up)
    # dQ/ds: v = x/s = [-6, -2.4, -0.8, 0.6, 1.2, 3.4, 1.8]; clamped low -> lo, high -> hi, inside round(v) - v
    dq = [-2, -2, round(-0.8) + 0.8, round(0.6) - 0.6, 1, 1, 1]
    expect = g * sum(u * d for u, d in zip(up.tolist(), dq))
    assert s.grad.item() == pytest.approx(expect, abs=1e-6)
    x2 = x.clone().requires_grad_(True)  # STE: identity inside the range, zero outside
    lsq_fake(x2, torch.tensor(0.5), lo, hi, g).backward(up)
    assert torch.equal(x2.grad, up * torch.tensor([0.0, 0, 1, 1, 0, 0, 0]))


def test_lsq_weight_parametrization_levels_and_init():
    torch.manual_seed(3)
    m = nn.Linear(32, 8)
    W0 = m.weight.detach().clone()
    prepare_lsq_qat(m, bits=2)
    p = m.parametrizations.weight[0]
    assert isinstance(p, LSQWeight) and p.s.requires_grad
    assert torch.allclose(p.s[:, 0], 2 * W0.abs().mean(1) / math.sqrt(1))  # 2 mean|W| / sqrt(2^(b-1) - 1)
    assert p.g == pytest.approx(1 / math.sqrt(1 * 32))
    k = p.levels(W0)
    assert torch.allclose(m.weight, k * p.s, atol=1e-6, rtol=0) and k.min() >= -2 and k.max() <= 1
    quantize_inputs({"m": m}, bits=4)
    m(torch.randn(5, 32)).sum().backward()
    assert p.s.grad is not None and m.input_quant.s.grad is not None
    a = LSQAct(3, signed=False)  # unsigned: [0, 7], init 4 mean|x| / sqrt(7)
    x = torch.rand(100)
    y = a(x)
    assert float(a.s.detach()) == pytest.approx(4 * float(x.mean()) / math.sqrt(7), rel=1e-6)
    y = y.detach()
    assert (y / a.s.detach()).round().unique().numel() <= 8 and float(y.min()) >= 0


def test_oscillation_counter_on_a_hand_made_sequence():
    seq = [0, 1, 0, 0, 1, 2, 1, 1, 2]
    # changes: +1, -1 (osc), 0, +1 (osc: last change was -1), +1, -1 (osc), 0, +1 (osc)
    t = LevelTrace(torch.tensor([seq[0]]), momentum=0.1)
    osc = [bool(t.update(torch.tensor([k]))) for k in seq[1:]]
    assert osc == [False, True, False, True, False, True, False, True]
    assert int(t.osc_count) == 4 and int(t.flip_count) == 6 and t.steps == 8
    ema = 0.0
    for o in osc:
        ema = 0.1 * o + 0.9 * ema
    assert float(t.ema) == pytest.approx(ema)
    levels = {"w": torch.tensor([0, 0, 0, 0])}
    steps = [[1, 0, 0, 0], [0, 1, 0, 0], [1, 2, 0, -1], [0, 3, 0, -2]]
    tr = OscillationTracker({"w": lambda: levels["w"]}, groups={"w": "qk"}, momentum=0.5, threshold=0.3)
    for s in steps:
        levels["w"] = torch.tensor(s)
        tr.step()
    out = tr.summary()
    # weight 0: +1 -1 +1 -1 -> 3 oscillations; weight 1: 0 +1 +1 +1 -> none; weight 3: monotone
    assert out["qk"]["osc_freq"] == pytest.approx(3 / (4 * 4))
    assert out["qk"]["flip_freq"] == pytest.approx((4 + 3 + 0 + 2) / 16)
    assert out["all"]["frac_oscillated"] == pytest.approx(0.25)
    assert out["all"]["frac_ema_above"] == pytest.approx(0.25)  # ema of weight 0 = 0.5*0.5 + ... > 0.3
    tr.reset_window()
    assert tr.summary()["all"]["osc_freq"] == 0


def test_statsq_grid_values_hand_computed():
    W = torch.tensor([[0.1, -0.3, 0.5, -0.9, 0.0, 2.0]])
    s = 2 * W.abs().mean()  # 2 * 3.8 / 6
    Q = sq.statsq_fake(W, 2)  # n = 2: levels s * {-3/4, -1/4, 1/4, 3/4}
    u = (W / s).clamp(-1, 1 - 1e-6)
    expect = s * (torch.floor(u * 2 - 0.5 + 0.5) + 0.5) / 2  # round(b) == floor(b + 1/2) off the ties
    assert torch.allclose(Q, expect)
    assert set((Q / s * 4).round().int().tolist()[0]) <= {-3, -1, 1, 3}
    assert torch.equal(sq.statsq_levels(W, 2), torch.round(u * 2 - 0.5))


def test_cga_br0_freezes_everything_and_br_half_nothing_through_adamw():
    torch.manual_seed(4)
    for br, all_frozen in ((0.0, True), (0.5, False)):
        m = nn.Linear(16, 8)
        with torch.no_grad():  # |W| in [0.5, 1): max < 2 mean|W| = s, so no weight is saturated (those stay confident)
            m.weight.copy_(torch.sign(torch.randn(8, 16)) * (0.5 + 0.5 * torch.rand(8, 16)))
        layers = sq.prepare_statsq_qat(m, bits=2)
        cga = sq.CGA(layers.values(), bits=2, br=br)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.5)
        W0 = cga.params[0].detach().clone()
        m(torch.randn(4, 16)).pow(2).sum().backward()
        frac = cga.before_step()
        opt.step()
        cga.after_step()
        W1 = cga.params[0].detach()
        if all_frozen:
            assert frac == 1.0 and torch.equal(W1, W0)  # bit-identical despite weight decay
        else:
            assert frac == 0.0 and (W1 != W0).all()


@pytest.mark.slow
def test_fidelity_benchmark_runs_every_variant_briefly():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fidelity_ofq as B

    class Args:
        bits, abits, lr, min_lr, br, qat_steps, anneal_steps = 2, 2, 2e-3, 0.05, 0.005, 12, 6

    torch.manual_seed(0)
    D = B.data()
    teacher = B.pretrain(0, D, 5)
    out = {v: B.qat_run(v, 0, teacher, D, Args) for v in "abcd"}
    assert out["a"]["frozen"] == 0 and out["c"]["frozen"] > 0.9 and out["d"]["frozen"] > 0.9
    m, fns, groups, _ = B.prepare("d", teacher, 2, 2)
    assert sum(f().numel() for n, f in fns.items() if groups.get(n) == "qk") == B.DEPTH * B.HEADS * B.DIM ** 2
    for r in out.values():
        assert set(r["osc_qat"]) == {"all", "qk", "other"} and 0 <= r["acc"] <= 1
