"""Rich vs lazy learning diagnostics (issue 22): kernel distance of empirical NTKs, representation and
target alignment by formula, the low-rank init, and lazy (large output scale) vs rich (small) on a planted task."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from weightlab.errors import ConfigError
from weightlab.inspect.richlazy import (empirical_ntk, kernel_alignment, kernel_distance, laziness, lowrank_init,
                                        representation_alignment, target_alignment, weight_change)


def test_kernel_distance_hand_case():
    assert kernel_distance(torch.eye(2), torch.ones(2, 2)) == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-12)
    K = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    assert kernel_distance(K, 7.5 * K) == pytest.approx(0.0, abs=1e-12)  # a rescaled kernel did not move
    assert kernel_distance(torch.tensor([[1.0, 0], [0, 0]]), torch.tensor([[0, 0], [0, 1.0]])) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="same probe"):
        kernel_distance(torch.eye(2), torch.eye(3))
    with pytest.raises(ConfigError, match="all-zero"):
        kernel_distance(torch.zeros(2, 2), torch.eye(2))


class Poly(nn.Module):
    """f(x) = w1 x + w2^2 x^2 / 2: df/dw1 = x, df/dw2 = w2 x^2, so K = x x^T + w2^2 q q^T, q = x^2."""

    def __init__(self, w1, w2):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.tensor(w1)), nn.Parameter(torch.tensor(w2))

    def forward(self, x):
        return self.w1 * x + 0.5 * self.w2 ** 2 * x ** 2


def test_empirical_ntk_hand_case():
    x = torch.tensor([[1.0], [2.0], [-1.0]])
    xs, q = x[:, 0].double(), x[:, 0].double() ** 2
    for w2 in (0.5, 2.0):
        K = empirical_ntk(Poly(0.3, w2), x)
        want = torch.outer(xs, xs) + w2 ** 2 * torch.outer(q, q)
        assert torch.allclose(K, want, atol=1e-6)
    # the kernel distance between the two by hand
    K0 = np.outer([1, 2, -1], [1, 2, -1]) + 0.25 * np.outer([1, 4, 1], [1, 4, 1])
    K1 = np.outer([1, 2, -1], [1, 2, -1]) + 4.0 * np.outer([1, 4, 1], [1, 4, 1])
    want = 1 - (K0 * K1).sum() / (np.linalg.norm(K0) * np.linalg.norm(K1))
    got = kernel_distance(empirical_ntk(Poly(0.3, 0.5), x), empirical_ntk(Poly(0.3, 2.0), x))
    assert got == pytest.approx(want, rel=1e-6) and got > 0.05


def test_empirical_ntk_matches_per_example_autograd(one_thread):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x = torch.randn(6, 5)
    grads = []
    for i in range(6):
        for k in range(3):
            g = torch.autograd.grad(m(x[i:i + 1])[0, k], list(m.parameters()))
            grads.append(torch.cat([t.reshape(-1) for t in g]))
    J = torch.stack(grads).double().reshape(6, 3, -1)
    want = torch.einsum("iap,jap->ij", J, J)
    assert torch.allclose(empirical_ntk(m, x), want, atol=1e-8)
    # restricted to the last layer: K = (h h^T + 1) * 3 outputs... by autograd again
    h = torch.tanh(m[0](x)).double()
    assert torch.allclose(empirical_ntk(m, x, params=["2.weight", "2.bias"]), 3 * (h @ h.t() + 1), atol=1e-8)


def test_representation_and_target_alignment_by_formula():
    rng = np.random.default_rng(0)
    H0, H1 = rng.standard_normal((8, 5)), rng.standard_normal((8, 4))
    G0, G1 = H0 @ H0.T, H1 @ H1.T
    want = (G0 * G1).sum() / (np.linalg.norm(G0) * np.linalg.norm(G1))
    assert representation_alignment(torch.tensor(H0), torch.tensor(H1)) == pytest.approx(want, rel=1e-10)
    Q = np.linalg.qr(rng.standard_normal((5, 5)))[0]
    assert representation_alignment(torch.tensor(H0), torch.tensor(3 * H0 @ Q)) == pytest.approx(1.0)
    C0, C1 = H0 - H0.mean(0), H1 - H1.mean(0)
    G0, G1 = C0 @ C0.T, C1 @ C1.T
    cka = (G0 * G1).sum() / (np.linalg.norm(G0) * np.linalg.norm(G1))
    assert representation_alignment(torch.tensor(H0), torch.tensor(H1), center=True) == pytest.approx(cka, rel=1e-10)
    y = np.array([1.0, -1, 1, 1, -1, -1, 1, -1])
    Y = np.outer(y, y)
    assert target_alignment(torch.tensor(G0), y) == pytest.approx((G0 * Y).sum() / (np.linalg.norm(G0) * 8))
    assert kernel_alignment(torch.tensor(Y), torch.tensor(Y)) == pytest.approx(1.0)


def test_lowrank_init_rank_norm_and_alignment():
    g = torch.Generator().manual_seed(0)
    for r in (1, 3, 12):
        W = lowrank_init(12, 20, r, 5.0, generator=g)
        assert torch.linalg.matrix_rank(W, rtol=1e-5) == r and float(W.norm()) == pytest.approx(5.0, rel=1e-5)
    left, right = torch.randn(12, 2, generator=g), torch.randn(20, 2, generator=g)
    W = lowrank_init(12, 20, 2, 1.0, generator=g, left=left, right=right)
    Ql = torch.linalg.qr(left)[0]
    assert torch.allclose(Ql @ (Ql.t() @ W), W, atol=1e-5)  # the column space is the given one
    with pytest.raises(ConfigError, match="rank 13"):
        lowrank_init(12, 20, 13, 1.0)


def test_weight_change_relative_and_effective_rank():
    a, b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        a.weight.copy_(torch.eye(4))
        b.weight.copy_(torch.eye(4) + torch.diag(torch.tensor([0.5, 0, 0, 0])))
    wc = weight_change(a, b)
    assert wc["total_rel_change"] == pytest.approx(0.5 / 2.0)  # ||dW|| = 0.5, ||I_4|| = 2
    row = wc["matrices"][0]
    assert row["effective_rank_init"] == pytest.approx(4.0) and row["effective_rank_change"] == pytest.approx(1.0)


class Scaled(nn.Module):
    """Chizat-Bach lazy scaling: f = alpha (g(x; theta) - g(x; theta_0)); large alpha trains lazily."""

    def __init__(self, net, alpha):
        super().__init__()
        self.net, self.alpha = net, alpha
        self.ref = copy.deepcopy(net).requires_grad_(False)

    def forward(self, x):
        return self.alpha * (self.net(x) - self.ref(x))


def _run(alpha, seed, steps=300):
    torch.manual_seed(seed)
    x = torch.randn(64, 4)
    y = torch.tanh(3 * x[:, :1]) * torch.sign(x[:, 1:2])  # planted nonlinear teacher
    m = Scaled(nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1)), alpha)
    m0 = copy.deepcopy(m)
    opt = torch.optim.SGD(m.net.parameters(), lr=0.1 / alpha ** 2)  # the lazy scaling's step size
    for _ in range(steps):
        opt.zero_grad()
        (m(x) - y).pow(2).mean().backward()
        opt.step()
    return laziness(m0, m, x[:32], params=[n for n, _ in m.named_parameters() if n.startswith("net.")],
                    features=lambda net, z: net.net[1](net.net[0](z)), y=y[:32]), \
        float((m(x) - y).pow(2).mean().detach()) / float(y.var())


def test_lazy_run_has_smaller_kernel_distance_than_rich_run(one_thread):
    for seed in (0, 1):
        lazy, loss_l = _run(alpha=10.0, seed=seed)
        rich, loss_r = _run(alpha=0.3, seed=seed)
        assert loss_l < 0.8 and loss_r < 0.8  # both fit the planted task (loss / variance of y)
        assert lazy["kernel_distance"] < rich["kernel_distance"] / 3
        assert lazy["total_rel_change"] < rich["total_rel_change"] / 3
        assert 1 - lazy["representation_alignment"] < (1 - rich["representation_alignment"]) / 3
        # the rich run's kernel turned toward the targets; the lazy one's barely moved
        assert rich["target_alignment_final"] - rich["target_alignment_init"] > \
            abs(lazy["target_alignment_final"] - lazy["target_alignment_init"])


def test_diverged_weights_are_a_clear_error():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    with torch.no_grad():
        b.weight[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="not finite"):
        weight_change(a, b)
