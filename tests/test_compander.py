"""Weight Compander (Cakaj et al. 2023): the paper's Eq. (1)-(4), its two variants, weight decay and Adam step."""
import math

import pytest
import torch
from torch import nn

from weightlab import adapt
from weightlab.adapt.compander import COMPANDERS, decay_penalty, param_groups
from weightlab.adapt.compander_opt import CompanderAdamW
from weightlab.errors import ConfigError


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (conftest.py)


def mlp(seed=0, d_in=32, d_h=24, d_out=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_h), nn.Tanh(), nn.Linear(d_h, d_out))


D = torch.float64


def test_arctan_values_at_hand_computed_points():
    """Eq. (1) w = a*arctan(v/b): arctan(1) = pi/4, arctan(sqrt 3) = pi/3, arctan(1/sqrt 3) = pi/6."""
    f, finv, bound = COMPANDERS["arctan"]
    a, b = torch.tensor(0.7, dtype=D), torch.tensor(0.5, dtype=D)
    v = torch.tensor([0.0, 0.5, -0.5, 0.5 * math.sqrt(3), 0.5 / math.sqrt(3)], dtype=D)
    want = torch.tensor([0.0, 0.7 * math.pi / 4, -0.7 * math.pi / 4, 0.7 * math.pi / 3, 0.7 * math.pi / 6], dtype=D)
    assert torch.allclose(f(v, a, b), want, atol=1e-15)
    # Eq. (4) v = b*tan(w/a) at those points, and the bound a*pi/2 (Sec. III-A)
    assert torch.allclose(finv(want, a, b), v, atol=1e-14)
    assert bound(0.7) == pytest.approx(0.7 * math.pi / 2)


@pytest.mark.parametrize("fn", ["arctan", "erf", "arsinh"])
def test_paper_properties_odd_monotone_bounded_slope(fn):
    f, finv, bound = COMPANDERS[fn]
    a, b = torch.tensor(0.8, dtype=D), torch.tensor(0.6, dtype=D)
    v = torch.linspace(-200, 200, 40001, dtype=D)
    w = f(v, a, b)
    assert torch.equal(f(-v, a, b), -w)  # odd
    near = v.abs() <= 2  # erf saturates to +-a in float64 beyond ~|v/b| = 6
    assert (w.diff() >= 0).all() and (w[near].diff() > 0).all()  # increasing, strictly where representable
    lim = bound(0.8)
    if math.isfinite(lim):  # |w| < a*pi/2 (arctan), < a (erf), approached far out
        assert w.abs().max() <= lim and w.abs().max() > 0.99 * lim
        assert fn != "arctan" or w.abs().max() < lim
    else:  # arsinh: unbounded (Sec. IV-F), only logarithmic growth
        assert w.abs().max() > 4.0
    v0 = torch.zeros((), dtype=D, requires_grad=True)
    (g0,) = torch.autograd.grad(f(v0, a, b), v0)
    slope0 = {"arctan": 0.8 / 0.6, "erf": 0.8 / 0.6 * 2 / math.sqrt(math.pi), "arsinh": 0.8 / 0.6}[fn]
    assert float(g0) == pytest.approx(slope0, rel=1e-12)  # a/b at 0 for arctan (Eq. 3)
    vv = torch.linspace(-5, 5, 101, dtype=D).requires_grad_(True)  # the slope falls with |v|:
    (g,) = torch.autograd.grad(f(vv, a, b).sum(), vv)
    pos = vv.detach() >= 0
    assert (g[pos].diff() < 0).all()  # near-zero weights move most
    ww = torch.linspace(-0.99, 0.99, 199, dtype=D) * min(lim, 3.0)
    assert torch.allclose(f(finv(ww, a, b), a, b), ww, atol=1e-12)  # the init inverse


def test_eq3_derivative_formula():
    f = COMPANDERS["arctan"].f
    a, b = torch.tensor(0.7, dtype=D), torch.tensor(0.8, dtype=D)
    v = torch.linspace(-3, 3, 61, dtype=D, requires_grad=True)
    (g,) = torch.autograd.grad(f(v, a, b).sum(), v)
    assert torch.allclose(g, a / (b * (1 + v.detach() ** 2 / b ** 2)), atol=1e-15)


def test_fixed_variant_identity_init_grads_fold():
    m = mlp()
    x = torch.randn(8, 32)
    y0 = m(x)
    W = {i: m[i].weight.detach().clone() for i in (0, 2)}
    adapt.attach(m, "compander", targets=["0", "2"])
    assert torch.allclose(m(x), y0, atol=1e-6)  # Eq. (4): Psi(v0) is the layer's own init
    assert adapt.count_trainable(m) == 24 * 32 + 16 * 24  # a, b fixed: buffers, not trained
    for i in (0, 2):
        a, b = m[i].method.hparams(m[i])
        assert float(a) == pytest.approx(0.7) and float(b) == pytest.approx(0.7)
        want = 0.7 * torch.tan(W[i].double() / 0.7)
        assert torch.allclose(m[i].adapter.V.double(), want, atol=1e-6)
    with torch.no_grad():  # big latents saturate at a*pi/2, never beyond
        m[0].adapter.V.mul_(1e4)
    assert m[0].method.weight(m[0]).abs().max() < 0.7 * math.pi / 2
    m(x).square().sum().backward()
    assert {n for n, p in m.named_parameters() if p.grad is not None} == {"0.adapter.V", "2.adapter.V"}
    y = m(x).detach()
    adapt.fold(m, unload=False)  # Sec. III-A4: Psi(v) copied into the plain layer gives the same net
    assert torch.allclose(m(x), y, atol=1e-6)
    adapt.unfold(m)
    assert all(torch.equal(m[i].base_layer.weight, W[i]) for i in (0, 2))
    adapt.attach(m, "compander", name="wc2", targets=["0"])  # a second, then unload to plain layers
    adapt.fold(m, name=["default"])


def test_learned_fine_init_and_gradcheck():
    m = mlp()
    adapt.attach(m, "compander", targets=["0", "2"], learn_hparams=True)
    assert adapt.count_trainable(m) == 24 * 32 + 2 + 16 * 24 + 2  # one (a, b) per layer (fine)
    a, b = m[0].method.hparams(m[0])
    assert (a.item(), b.item()) == (0.5, 1.0)  # Sec. IV-E's best init
    m(torch.randn(4, 32)).sum().backward()
    assert {n for n, p in m.named_parameters() if p.grad is not None} == {
        f"{i}.adapter.{t}" for i in (0, 2) for t in ("V", "a", "b")}
    f = COMPANDERS["arctan"].f
    v = torch.randn(5, 3, dtype=D, requires_grad=True)
    aa = torch.tensor(0.6, dtype=D, requires_grad=True)
    bb = torch.tensor(0.9, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, a, b: f(v, a, b), (v, aa, bb))
    # the closed forms: dPsi/da = arctan(v/b), dPsi/db = -a v / (b^2 + v^2)
    f(v, aa, bb).sum().backward()
    vd = v.detach()
    assert torch.allclose(aa.grad, torch.atan(vd / 0.9).sum())
    assert torch.allclose(bb.grad, (-0.6 * vd / (0.81 + vd ** 2)).sum())


def test_learned_coarse_shares_one_pair():
    x = torch.randn(4, 32)
    coarse, fine = mlp(), mlp()
    adapt.attach(coarse, "compander", targets=["0", "2"], learn_hparams=True, share="model", a=0.9, b=0.8)
    adapt.attach(fine, "compander", targets=["0", "2"], learn_hparams=True, a=0.9, b=0.8)
    (a0, b0), (a2, b2) = (coarse[i].method.hparams(coarse[i]) for i in (0, 2))
    assert a0 is a2 and b0 is b2 and a0 is coarse[0].adapter.a  # registered once, on the first layer
    assert adapt.count_trainable(coarse) == 24 * 32 + 16 * 24 + 2
    coarse(x).sum().backward()
    fine(x).sum().backward()
    for t in ("a", "b"):  # the shared parameter's gradient is the sum of the per-layer ones
        want = getattr(fine[0].adapter, t).grad + getattr(fine[2].adapter, t).grad
        assert torch.allclose(getattr(coarse[0].adapter, t).grad, want, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"learn_hparams": True}, {"learn_hparams": True, "share": "model"}])
def test_save_load_round_trip(tmp_path, kw):
    m = mlp()
    adapt.attach(m, "compander", targets=["0", "2"], **kw)
    opt = torch.optim.SGD(adapt.trainable_parameters(m), lr=0.05)
    x = torch.randn(16, 32)
    for _ in range(3):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
    adapt.save(m, tmp_path / "wc")
    m2 = mlp()
    adapt.load(m2, tmp_path / "wc")
    assert torch.allclose(m2(x), m(x), atol=1e-6)
    assert [t.item() for t in m2[2].method.hparams(m2[2])] == [t.item() for t in m[2].method.hparams(m[2])]


def test_conv_and_bias_untouched_and_errors():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    x = torch.randn(2, 3, 6, 6)
    conv.eval()
    y0 = conv(x)
    adapt.attach(conv, "compander", targets=["0"], fn="erf", a=1.0, b=0.5)
    assert torch.allclose(conv(x), y0, atol=1e-5)
    names = {n for n, p in conv.named_parameters() if p.requires_grad}
    assert names == {"0.adapter.V"}  # only the weight is reparameterized (Sec. III-A: not biases, not BN)
    with pytest.raises(ConfigError, match="must exceed max"):  # |W| >= a*pi/2: Eq. (4) undefined
        adapt.attach(mlp(), "compander", targets=["0"], a=0.05)
    with pytest.raises(ConfigError, match="a, b > 0"):
        adapt.attach(mlp(), "compander", targets=["0"], b=0.0)
    with pytest.raises(ConfigError, match="unknown compander"):
        adapt.attach(mlp(), "compander", targets=["0"], fn="tanh")


def test_weight_decay_on_w_for_fixed_and_on_v_for_learned():
    m = mlp()
    adapt.attach(m, "compander", targets=["0", "2"])
    for p in m.parameters():  # train the biases too, as the paper's from-scratch networks do
        if not p.requires_grad and p.dim() == 1:
            p.requires_grad_(True)
    decayed, plain = param_groups(m, 5e-4)
    assert {id(p) for p in plain["params"]} == {id(m[0].adapter.V), id(m[2].adapter.V)}
    assert decayed["weight_decay"] == 5e-4 and len(decayed["params"]) == 2  # the two biases
    pen = decay_penalty(m, 5e-4)
    W = [m[i].method.weight(m[i]).detach() for i in (0, 2)]
    assert pen.item() == pytest.approx(0.5 * 5e-4 * sum(float(w.square().sum()) for w in W), rel=1e-6)
    pen.backward()  # d pen / dv = wd * w * Psi'(v): SGD's decay on w, through the chain rule
    V = m[0].adapter.V.detach().double()
    want = 5e-4 * W[0].double() * 0.7 / (0.7 * (1 + V ** 2 / 0.49))
    assert torch.allclose(m[0].adapter.V.grad.double(), want, atol=1e-12)
    m2 = mlp()
    adapt.attach(m2, "compander", targets=["0", "2"], learn_hparams=True)
    decayed, plain = param_groups(m2, 5e-4)
    assert {id(p) for p in plain["params"]} == {id(getattr(m2[i].adapter, t)) for i in (0, 2) for t in "ab"}
    assert {id(p) for p in decayed["params"]} == {id(m2[i].adapter.V) for i in (0, 2)}
    assert float(decay_penalty(m2, 5e-4)) == 0.0


def test_modified_adam_step_is_adam_on_dL_dw_times_slope():
    """Sec. III-A3: the adaptive step from dL/dw, then multiplied by dPsi/dv; plain params: torch AdamW."""
    m = mlp()
    adapt.attach(m, "compander", targets=["0"])
    m[2].weight.requires_grad_(True)
    opt = adapt.make_optimizer(m, 1e-2, weight_decay=0.1)
    assert isinstance(opt, CompanderAdamW)
    ref_p = m[2].weight.detach().clone().requires_grad_(True)
    ref = torch.optim.AdamW([ref_p], lr=1e-2, weight_decay=0.1, foreach=False)
    x = torch.randn(8, 32)
    V0 = m[0].adapter.V.detach().clone()
    m(x).square().sum().backward()
    gV, gW2 = m[0].adapter.V.grad.clone(), m[2].weight.grad.clone()
    ref_p.grad = gW2.clone()
    opt.step()
    ref.step()
    assert torch.allclose(m[2].weight, ref_p, atol=1e-7)
    s = 0.7 / (0.7 * (1 + V0.double() ** 2 / 0.49))  # Eq. (3) with a = b = 0.7
    w = 0.7 * torch.atan(V0.double() / 0.7)
    gw = gV.double() / s  # first Adam step on g: m_hat / sqrt(v_hat) = sign(g) (up to eps)
    step = gw / (gw.abs() + 1e-8) + 0.1 * w
    assert torch.allclose(m[0].adapter.V.double(), V0.double() - 1e-2 * step * s, atol=1e-6)


@pytest.mark.slow
def test_trains_on_digits_with_the_papers_recipe_bounded_throughout():
    """SGD + momentum, wd on Psi(v): learns digits; every weight stays inside (-a*pi/2, a*pi/2) at every step."""
    from weightlab import zoo

    ds = zoo.digits()
    torch.manual_seed(0)
    m = zoo.MLP(64, (64, 64), 10)
    adapt.attach(m, "compander", targets=r"body\.[0-9]+", a=0.5, b=0.5)
    for n, p in m.named_parameters():
        if n.endswith("bias"):
            p.requires_grad_(True)
    opt = torch.optim.SGD(param_groups(m, 5e-4), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    top = 0.0
    for _ in range(10):
        perm = torch.randperm(len(ds.y_train), generator=g)
        for s in range(0, len(perm), 64):
            i = perm[s:s + 64]
            loss = nn.functional.cross_entropy(m(ds.x_train[i]), ds.y_train[i]) + decay_penalty(m, 5e-4)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                layers = adapt.adapter_layers(m).values()
                top = max(top, max(float(lay.method.weight(lay).abs().max()) for lay in layers))
    assert top < 0.5 * math.pi / 2
    with torch.no_grad():
        logits = m(ds.x_test)
        adapt.fold(m)
        assert torch.allclose(m(ds.x_test), logits, atol=1e-5)  # folded plain MLP == reparameterized one
    assert float((logits.argmax(1) == ds.y_test).float().mean()) > 0.93
