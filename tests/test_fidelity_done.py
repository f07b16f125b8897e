"""DONE (doubly robust instance-reweighted adversarial training): the PGD attack, the KL-DRO weights and
the training loop. Hand-computed cases and exact identities; tiny models."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from weightlab.data.done import DONEConfig, pgd_attack, robust_accuracy, train_done
from weightlab.data.dro import DROReweighter
from weightlab.errors import ConfigError
from weightlab.tensor.reweight import kl_dro_value

pytestmark = pytest.mark.usefixtures("one_thread")


def _two_class_linear(w):
    """logits = [0, w.x]: for label 0 the loss grows along +w, so the ascent direction is sign(w)."""
    lin = nn.Linear(len(w), 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([w]))
    return lambda x: torch.cat([torch.zeros(len(x), 1), lin(x)], 1)


def test_pgd_hand_case_steps_and_projection():
    model = _two_class_linear([1.0, -2.0, 0.5])
    x, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    one = pgd_attack(model, x, y, epsilon=1.0, step_size=0.4, steps=1, random_start=False)
    assert torch.equal(one, torch.tensor([[0.4, -0.4, 0.4]] * 2))
    two = pgd_attack(model, x, y, epsilon=1.0, step_size=0.4, steps=2, random_start=False)
    assert torch.allclose(two, torch.tensor([[0.8, -0.8, 0.8]] * 2))
    three = pgd_attack(model, x, y, epsilon=1.0, step_size=0.4, steps=3, random_start=False)
    assert torch.equal(three, torch.tensor([[1.0, -1.0, 1.0]] * 2))  # 1.2 projected back onto the ball
    boxed = pgd_attack(model, x, y, epsilon=1.0, step_size=0.4, steps=3, random_start=False, clip=(0.0, 0.5))
    assert torch.equal(boxed, torch.tensor([[0.5, 0.0, 0.5]] * 2))


def test_pgd_counts_steps_stays_in_ball_and_leaves_model_grads():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    calls = []
    model = lambda x: (calls.append(1), net(x))[1]  # noqa: E731
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    g = torch.Generator().manual_seed(1)
    adv = pgd_attack(model, x, y, epsilon=0.1, step_size=0.03, steps=7, generator=g)
    assert len(calls) == 7
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and not adv.requires_grad
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ConfigError):
        pgd_attack(model, x, y, epsilon=0.1, step_size=0.0, steps=3)


def test_pgd_raises_the_loss_over_clean_and_one_step():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(256, 8)
    y = (x[:, :4]).argmax(1)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    clean = F.cross_entropy(net(x), y).item()
    fgsm = F.cross_entropy(net(pgd_attack(net, x, y, 0.3, 0.3, 1, random_start=False)), y).item()
    pgd = F.cross_entropy(net(pgd_attack(net, x, y, 0.3, 0.075, 10, random_start=False)), y).item()
    assert clean < fgsm <= pgd + 1e-6 and pgd > 2 * clean


def test_dro_weights_are_softmax_by_hand_and_exact_gradient():
    r = 0.5
    losses = torch.tensor([0.0, math.log(2) * r, math.log(3) * r, math.log(4) * r])
    rw = DROReweighter(temperature=r)
    assert torch.allclose(rw.weights(losses), torch.tensor([1, 2, 3, 4]) / 10.0, atol=1e-7)
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    g1 = torch.autograd.grad(rw(F.cross_entropy(lin(x), y, reduction="none")), list(lin.parameters()))
    value = kl_dro_value(F.cross_entropy(lin(x), y, reduction="none"), r)
    g2 = torch.autograd.grad(value, list(lin.parameters()))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-6)
    # and the value is r log mean exp(l / r) by hand
    l = F.cross_entropy(lin(x), y, reduction="none").detach().double()
    assert abs(float(value.detach()) - r * math.log(float(torch.exp(l / r).mean()))) < 1e-5


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def test_done_with_huge_r_is_pgd_at_and_small_r_differs():
    x, y = _data()
    cfg = dict(epsilon=0.1, step_size=0.025, steps=3, epochs=3, batch_size=32, lr=0.05)
    a, b, c = _net(), _net(), _net()
    ha = train_done(a, x, y, weighting="uniform", **cfg)
    hb = train_done(b, x, y, weighting="dro", temperature=1e6, **cfg)
    train_done(c, x, y, weighting="dro", temperature=0.2, **cfg)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)
    assert not all(torch.allclose(pa, pc, atol=1e-3) for pa, pc in zip(a.parameters(), c.parameters()))
    assert ha["ess"] == pytest.approx([1.0] * 3) and len(ha["adv_loss"]) == 3
    assert ha["adv_loss"] == pytest.approx(hb["adv_loss"], rel=1e-5)


def test_done_warmup_is_uniform_then_reweights():
    x, y = _data()
    h = train_done(_net(), x, y, epsilon=0.1, step_size=0.05, steps=2, epochs=3, warmup_epochs=2,
                   temperature=0.1, batch_size=32)
    assert h["ess"][:2] == pytest.approx([1.0, 1.0]) and h["ess"][2] < 0.9


def test_robust_accuracy_eps_zero_is_clean_and_worst_class():
    x, y = _data()
    net = _net()
    train_done(net, x, y, epsilon=0.0, step_size=0.1, steps=1, epochs=5, weighting="uniform", batch_size=32)
    ev = robust_accuracy(net, x, y, epsilon=0.0, step_size=0.1, steps=1)
    with torch.no_grad():
        acc = float((net(x).argmax(1) == y).double().mean())
    assert ev["clean"] == ev["robust"] == pytest.approx(acc)
    assert ev["worst_class_robust"] == min(ev["per_class_robust"].values()) <= ev["robust"]
    strong = robust_accuracy(net, x, y, epsilon=1.0, step_size=0.25, steps=10)
    assert strong["robust"] < ev["robust"]


def test_bad_input_is_a_config_error():
    x, y = _data()
    with pytest.raises(ConfigError, match="labels"):
        train_done(_net(), x, y[:-1], epochs=1)
    with pytest.raises(Exception):
        DONEConfig(temperature=0)
