"""GradNormLoRP fidelity (issue 22): the gradient projection shrinks the optimizer state at the defaults;
state bytes by formula, the projected update by hand, the projection refresh period."""
import numpy as np
import pytest
import torch
from torch import nn

from weightlab import adapt
from weightlab.adapt.gradnormlorp import GradNormLoRPConfig, ProjectedAdamW, projection_rank, state_bytes

F32 = 4


def _attached(method, in_f=24, out_f=40, **kw):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(in_f, out_f))
    adapt.attach(m, method, **kw)
    with torch.no_grad():  # B = 0 at init would give A a zero gradient; move every factor
        for p in adapt.trainable_parameters(m):
            p.add_(0.1 * torch.randn(p.shape))
    return m


def _one_step(m, opt):
    x = torch.randn(16, getattr(m[0], "base_layer", m[0]).in_features, generator=torch.Generator().manual_seed(1))
    opt.zero_grad()
    m(x).pow(2).mean().backward()
    opt.step()


def test_default_projection_rank_is_below_the_adapter_rank():
    cfg = GradNormLoRPConfig()
    assert cfg.r == 8 and cfg.proj_rank is None and projection_rank(cfg) == 4
    assert projection_rank(GradNormLoRPConfig(r=16, proj_rank=3)) == 3
    assert projection_rank(GradNormLoRPConfig(r=1)) == 1


def test_state_bytes_by_formula_vs_lora_and_full(one_thread):
    i, o, r, k = 24, 40, 8, 4
    g = _attached("gradnormlorp", i, o, r=r)
    og = adapt.make_optimizer(g, 1e-3)
    assert isinstance(og, ProjectedAdamW)
    _one_step(g, og)
    shapes = {tuple(st["m"].shape) for st in og.state.values()}
    assert shapes == {(k, i), (o, k), (o,)}  # A: U_k^T G (k x in); B: G V_k (out x k); magnitude: plain Adam
    # m and v of A and B in the projected space + the projectors (r x k each) + m, v of the magnitude
    assert state_bytes(og) == F32 * (2 * k * i + 2 * o * k + 2 * r * k + 2 * o)

    lo = _attached("lora", i, o, r=r)
    ol = adapt.make_optimizer(lo, 1e-3)
    _one_step(lo, ol)
    assert state_bytes(ol) == F32 * (2 * r * (i + o) + 2)  # exp_avg, exp_avg_sq r x (in+out); 2 step scalars

    full = nn.Linear(i, o)
    of = torch.optim.AdamW(full.parameters(), lr=1e-3)
    _one_step(nn.Sequential(full), of)
    assert state_bytes(of) == F32 * (2 * o * i + 2 * o + 2)
    assert state_bytes(og) < state_bytes(ol) < state_bytes(of)


def test_projected_update_equals_hand_computation():
    """Two steps on a 6 x 10 matrix (left projection, rank 2): numpy SVD + the Adam recursion by hand."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((6, 10))
    G1, G2 = rng.standard_normal((6, 10)), rng.standard_normal((6, 10))
    lr, b1, b2, eps, scale, k = 0.01, 0.9, 0.999, 1e-8, 0.25, 2
    p = nn.Parameter(torch.tensor(p0, dtype=torch.float32))
    opt = ProjectedAdamW([p], lr=lr, rank=k, scale=scale, update_proj_gap=200)
    U = np.linalg.svd(G1)[0][:, :k]  # the projector of step 1 (kept for step 2: gap 200)
    m = v = np.zeros((k, 10))
    want = p0.copy()
    for t, G in ((1, G1), (2, G2)):
        p.grad = torch.tensor(G, dtype=torch.float32)
        opt.step()
        R = U.T @ G
        m, v = b1 * m + (1 - b1) * R, b2 * v + (1 - b2) * R * R
        upd = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        want = want - lr * scale * (U @ upd)  # sign flips of U's columns cancel in U @ f(U^T G)
        np.testing.assert_allclose(p.detach().numpy(), want, atol=2e-6)
    assert not np.allclose(want, p0 - lr * scale * np.sign(G1))  # the projection really restricted the update


def test_right_projection_for_tall_gradients():
    rng = np.random.default_rng(1)
    G = rng.standard_normal((12, 5))
    p = nn.Parameter(torch.zeros(12, 5))
    opt = ProjectedAdamW([p], lr=1.0, rank=2, scale=1.0)
    p.grad = torch.tensor(G, dtype=torch.float32)
    opt.step()
    st = opt.state[p]
    assert st["P"][0] == "right" and st["m"].shape == (12, 2)
    V = np.linalg.svd(G)[2][:2].T
    R = G @ V
    np.testing.assert_allclose(-p.detach().numpy(), (R / (np.abs(R) + 1e-8)) @ V.T, atol=1e-5)


def test_projection_refresh_period():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(6, 10))
    opt = ProjectedAdamW([p], lr=1e-3, rank=2, update_proj_gap=3)
    refreshed = []
    for t in range(1, 9):
        G = torch.randn(6, 10)
        p.grad = G
        before = opt.state[p].get("P") if p in opt.state else None
        opt.step()
        P = opt.state[p]["P"][1]
        if P is not before[1] if before else True:
            refreshed.append(t)
            U = torch.linalg.svd(G)[0][:, :2]
            assert torch.allclose((P.t() @ U).abs(), torch.eye(2), atol=1e-4)  # the top-2 of this step's G
    assert refreshed == [1, 4, 7]


def test_a_complete_projection_warns():
    m = nn.Sequential(nn.Linear(8, 8))
    adapt.attach(m, "gradnormlorp", r=4, proj_rank=8)
    with pytest.warns(UserWarning, match="saves|shrink"):
        adapt.make_optimizer(m, 1e-3)


def test_default_projection_still_trains(one_thread):
    """Planted task: the fine-tune target is a rank-2 change of the base; the projected optimizer
    at its defaults (proj_rank 4 < r 8) drives the loss down by more than 10x."""
    torch.manual_seed(0)
    base = nn.Linear(16, 16, bias=False)
    tgt = base.weight.detach() + 0.5 * torch.randn(16, 2) @ torch.randn(2, 16) / 4
    x = torch.randn(256, 16)
    y = x @ tgt.t()
    m = nn.Sequential(base)
    adapt.attach(m, "gradnormlorp", seed=0)
    opt = adapt.make_optimizer(m, 1e-2)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = (m(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_low_memory_forward_equals_the_materialized_weight(kind, one_thread):
    """The row norm from r x r and out x r products equals ||W0 + s B A||_row: outputs and every
    gradient match the materialized W' = m (W0 + s B A) / ||W0 + s B A||_row."""
    import transformers

    torch.manual_seed(0)
    lin = nn.Linear(12, 9) if kind == "linear" else transformers.pytorch_utils.Conv1D(9, 12)
    m = nn.Sequential(lin)
    adapt.attach(m, "gradnormlorp", r=4, seed=0)
    with torch.no_grad():
        for p in adapt.trainable_parameters(m):
            p.add_(0.3 * torch.randn(p.shape))
    x = torch.randn(5, 12)
    layer = m[0]
    meth = layer.method
    W0 = layer.weight_2d().float()
    want = x @ meth.weight(layer, W0).t() + layer.base_layer.bias
    got = m(x)
    assert torch.allclose(got, want, atol=1e-5)
    params = list(adapt.trainable_parameters(m))
    g1 = torch.autograd.grad(got.sin().sum(), params)
    g2 = torch.autograd.grad(want.sin().sum(), params)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5)
    a = layer.adapter
    V = W0 + meth.scale(layer) * a.lora_B @ a.lora_A
    assert torch.allclose(meth.row_norm(layer, W0), V.norm(dim=1), atol=1e-5)
