"""Loss reweighting, KL-DRO weights and LDR losses (issue 9's proofs)."""
import math

import pytest
import torch
from torch.nn import functional as F

import weightlab as wl
from weightlab import data as D
from weightlab.tensor.reweight import (aldr_lambda, kl_dro_objective, kl_dro_value, kl_dro_weights, ldr_kl,
                                       loss_reweight_weights, normalized_losses)

L = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)


# ----------------------------------------------------------------------------- loss-based reweighting

@pytest.mark.parametrize("strategy, expected", [
    ("linupper", [0.028, 0.057, 0.237, 0.339, 0.339]),
    ("quadratic", [0.041, 0.138, 0.469, 0.312, 0.041]),
    ("mid", [0.041, 0.138, 0.469, 0.312, 0.041]),
    ("extremes", [0.351, 0.172, 0.041, 0.084, 0.351]),
])
def test_reweight_matches_hand_computed(strategy, expected):
    w = loss_reweight_weights(L, strategy, 0.4)
    assert w.sum().item() == pytest.approx(1.0)
    assert w.tolist() == pytest.approx(expected, abs=1.5e-3)


def test_reweight_hand_formula_exact():
    h = (2 * L - 4.5) / 3.5
    f = torch.minimum(h + 1, torch.ones_like(h))
    assert torch.allclose(normalized_losses(L), h)
    assert torch.allclose(loss_reweight_weights(L, "linupper", 0.4), torch.exp(f / 0.4) / torch.exp(f / 0.4).sum())


@pytest.mark.parametrize("strategy", ["linupper", "quadratic", "extremes", "upper"])
def test_reweight_tends_to_uniform_with_temperature(strategy):
    losses = torch.rand(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5
    gaps = [float((loss_reweight_weights(losses, strategy, r) - 1 / 64).abs().max()) for r in (0.4, 4, 40, 400)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-4
    assert gaps[0] > 1e-3  # not uniform at the default temperature
    assert torch.allclose(loss_reweight_weights(losses, strategy, math.inf), torch.full((64,), 1 / 64,
                                                                                      dtype=torch.float64))


def test_linupper_monotone_and_flat_above_midpoint():
    losses = torch.linspace(0, 10, 101, dtype=torch.float64)
    w = loss_reweight_weights(losses, "linupper", 0.4)
    assert bool((w[1:] >= w[:-1] - 1e-15).all())
    upper = losses >= 5
    assert torch.allclose(w[upper], w[upper][0].expand(int(upper.sum())))
    assert w[0] < w[-1] / 10


def test_equal_losses_and_counts():
    assert torch.allclose(loss_reweight_weights(torch.full((4,), 2.0), "extremes", 0.4), torch.full((4,), 0.25))
    counts = torch.tensor([1.0, 3.0, 0.0, 4.0])
    w = loss_reweight_weights(torch.rand(4), "uniform", 0.4, counts=counts)
    assert torch.allclose(w, counts / 8)


def test_reweighter_burn_in_and_gradient():
    rw = D.LossReweighter(strategy="extremes", temperature=0.4, burn_in=2)
    losses = L.clone().requires_grad_(True)
    for _ in range(2):  # burn-in: the plain mean
        out = rw(losses)
        assert out.item() == pytest.approx(L.mean().item())
    out = rw(losses)
    expected_w = loss_reweight_weights(L, "extremes", 0.4)
    assert out.item() == pytest.approx(float((expected_w * L).sum()))
    out.backward()
    assert torch.allclose(losses.grad, expected_w)  # weights carry no gradient
    assert rw.step == 3 and rw.state_dict() == {"step": 3}


def test_reweighter_in_plain_training_loop():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rw = wl.get_method("data", "loss-reweight").fn(burn_in=5)
    first = None
    for _ in range(30):
        losses = F.cross_entropy(model(x), y, reduction="none")
        loss = rw(losses)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert F.cross_entropy(model(x), y).item() < 0.5 * first


def test_reweight_config_validation():
    spec = wl.get_method("data", "loss-reweight")
    with pytest.raises(wl.ConfigError, match="temperature"):
        spec.make_config({"temperature": 0})
    with pytest.raises(wl.ConfigError, match="strategy"):
        spec.make_config({"strategy": "lower"})
    assert spec.make_config({"strategy": "mid"}).strategy == "quadratic"


# ----------------------------------------------------------------------------- KL-DRO

def test_dro_closed_form_maximises_inner_objective():
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(7, generator=g, dtype=torch.float64) * 3
    for r in (0.1, 1.0, 5.0):
        w = kl_dro_weights(losses, r)
        best = kl_dro_objective(w, losses, r)
        assert best.item() == pytest.approx(kl_dro_value(losses, r).item(), rel=1e-10)
        rand = torch.distributions.Dirichlet(torch.ones(7, dtype=torch.float64)).sample((2000,))
        others = torch.stack([kl_dro_objective(v, losses, r) for v in rand])
        assert bool((others <= best + 1e-12).all())


def test_dro_limits_and_gradient():
    assert torch.allclose(kl_dro_weights(L, 1e6), torch.full((5,), 0.2, dtype=torch.float64), atol=1e-6)
    w0 = kl_dro_weights(L, 1e-3)
    assert w0.argmax().item() == 4 and w0[4].item() == pytest.approx(1.0)
    # the weighted loss with fixed weights has the gradient of r log mean exp(l / r)
    a = L.clone().requires_grad_(True)
    kl_dro_value(a, 0.7).backward()
    b = L.clone().requires_grad_(True)
    D.DROReweighter(temperature=0.7)(b).backward()
    assert torch.allclose(a.grad, b.grad)


def test_dro_running_mean_option():
    rw = D.DROReweighter(temperature=1.0, momentum=0.5)
    w1 = rw.weights(L)  # first batch: u = its own mean, so the weights sum to 1
    assert w1.sum().item() == pytest.approx(1.0)
    w2 = rw.weights(L + 1)  # u lags behind: weights sum to more than 1
    u = 0.5 * torch.exp(L).mean() + 0.5 * torch.exp(L + 1).mean()
    assert torch.allclose(w2, torch.exp(L + 1) / (5 * u))
    again = D.DROReweighter(temperature=1.0, momentum=0.5)
    again.load_state_dict(rw.state_dict())
    assert torch.allclose(again.weights(L), rw.weights(L))


# ----------------------------------------------------------------------------- LDR / ALDR

def test_ldr_equals_cross_entropy_minus_log_k_at_lambda_one():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(20, 6, generator=g, dtype=torch.float64), torch.randint(0, 6, (20,), generator=g)
    got = ldr_kl(z, y, lam=1.0, margin=0.0, normalize="none")
    assert torch.allclose(got, F.cross_entropy(z, y, reduction="none") - math.log(6))


def test_ldr_limits():
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(30, 5, generator=g, dtype=torch.float64) * 3, torch.randint(0, 5, (30,), generator=g)
    c = 0.7
    onehot = F.one_hot(y, 5).double()
    d = c * (1 - onehot) + z - (z * onehot).sum(1, keepdim=True)
    crammer_singer = d.max(1).values  # includes k = y (0): max(0, max_{k != y} c + z_k - z_y)
    mean_margin = d.mean(1)
    assert torch.allclose(ldr_kl(z, y, 1e-4, c, "none"), crammer_singer, atol=2e-3)
    assert torch.allclose(ldr_kl(z, y, 1e5, c, "none"), mean_margin, atol=1e-3)
    # in between, monotone in lambda: from the max down to the mean
    vals = [ldr_kl(z, y, lam, c, "none") for lam in (0.01, 0.1, 1, 10, 100)]
    assert all(bool((a >= b - 1e-12).all()) for a, b in zip(vals, vals[1:]))


def test_ldr_softplus_normalisation_and_module():
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    zn = F.softplus(z) / F.softplus(z).mean(1, keepdim=True)
    crit = wl.get_method("data", "ldr-kl").fn(reduction="none")
    assert torch.allclose(crit(z, y), ldr_kl(zn, y, 10.0, 0.1, "none"), atol=1e-6)
    assert torch.allclose(crit(z * 5, y), ldr_kl(F.softplus(z * 5) / F.softplus(z * 5).mean(1, keepdim=True),
                                                 y, 10.0, 0.1, "none"), atol=1e-6)


def test_aldr_lambda_rules():
    k = 4
    flat = torch.zeros(3, k)  # uniform prediction: KL = 0 -> lambda = lambda0
    assert torch.allclose(aldr_lambda(flat, torch.full((3,), 10.0), 10.0, 2.0), torch.full((3,), 10.0), atol=1e-4)
    z = torch.tensor([[1.0, 0, 0, 0], [5.0, 0, 0, 0], [50.0, 0, 0, 0]])
    lam = aldr_lambda(z, torch.ones(3), 10.0, 2.0)
    assert lam[0] > lam[1] > lam[2]  # more confident -> smaller lambda
    assert bool((lam >= 10.0 * (1 - 1 / 2.0) - 1e-6).all())  # never below lambda0 (1 - 1/alpha)


def test_aldr_module_keeps_per_sample_state():
    crit = D.ALDRKLLoss(num_samples=10)
    z = torch.tensor([[3.0, 1.0, 1.0], [1.0, 1.0, 1.1]], requires_grad=True)
    loss = crit(z, torch.tensor([0, 0]), torch.tensor([3, 7]))
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    lam = crit.lambdas
    assert lam[3] < lam[7] < 10.0 and torch.equal(lam[[0, 1, 2, 4, 5, 6, 8, 9]], torch.full((8,), 10.0))
    with pytest.raises(wl.ConfigError, match="ids"):
        crit(z, torch.tensor([0, 0]))
    with pytest.raises(wl.ConfigError, match="alpha"):
        wl.get_method("data", "aldr-kl").make_config({"alpha": 1.0})
