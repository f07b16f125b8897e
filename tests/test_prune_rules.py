"""Pruning rules on synthetic layers (method notes sections 1-5, 7, 8, 9)."""
import pytest
import torch

import weightlab as wl
from weightlab.compress.allocation import lamp
from weightlab.compress.gblm import GblmConfig, gblm
from weightlab.compress.magnitude import MagnitudeConfig, magnitude
from weightlab.compress.rules import LayerContext
from weightlab.compress.wanda import WandaConfig, wanda
from weightlab.engine.calibration import LayerStats
from weightlab.tensor.obs import inverse_hessian_factor, sparsegpt
from weightlab.tensor.pruning import lamp_scores, nm_mask, row_mask
from weightlab.tensor.rd import brute_force, rd_allocate


def _layer(seed=0, dout=64, din=256, n=4096):
    """A layer with correlated inputs and 8 outlier features x10, as in the method notes."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(din, din, generator=g) / din ** 0.5
    X = torch.randn(n, din, generator=g) @ A
    X[:, :8] *= 10
    W = torch.randn(dout, din, generator=g)
    lin = torch.nn.Linear(din, dout, bias=False)
    stats = LayerStats(lin)
    for chunk in X.split(128):  # 32 "sequences" of 128 tokens
        stats.add(chunk.unsqueeze(0))
    return W, X, stats, lin


def _err(W, W_hat, X):
    return float(((W - W_hat) @ X.T).pow(2).sum() / (W @ X.T).pow(2).sum())


def _ctx(W, stats, lin, s=0.5, nm=None, cfg=None, extra=None):
    return LayerContext("l", lin, W, s, nm, cfg, stats, extra or {})


def test_error_ordering_sparsegpt_wanda_magnitude():
    W, X, stats, lin = _layer()
    mag, _ = magnitude(_ctx(W, stats, lin, cfg=MagnitudeConfig()))
    wan, _ = wanda(_ctx(W, stats, lin, cfg=WandaConfig()))
    sgpt, _, _ = sparsegpt(W, stats.H, 0.5)
    e = [_err(W, x, X) for x in (sgpt, wan, mag)]
    assert e[0] < e[1] < e[2], e
    assert e[1] < 0.5 * e[2]  # outlier features: Wanda far better than magnitude (notes: 0.019 vs 0.074)


def test_exact_sparsity_per_row_and_layer():
    W, X, stats, lin = _layer()
    _, m = wanda(_ctx(W, stats, lin, 0.37, cfg=WandaConfig()))
    assert ((~m).sum(1) == int(0.37 * 256)).all()
    _, m = magnitude(_ctx(W, stats, lin, 0.37, cfg=MagnitudeConfig()))
    assert int((~m).sum()) == int(0.37 * W.numel())
    _, m, _ = sparsegpt(W, stats.H, 0.37, blocksize=128)
    for b in range(2):  # exact per 128-column block
        assert int((~m[:, b * 128:(b + 1) * 128]).sum()) == int(0.37 * 64 * 128)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_structure_holds_for_every_rule(nm):
    W, X, stats, lin = _layer()
    masks = [magnitude(_ctx(W, stats, lin, nm=nm, cfg=MagnitudeConfig()))[1],
             wanda(_ctx(W, stats, lin, nm=nm, cfg=WandaConfig()))[1],
             sparsegpt(W, stats.H, 0.5, nm)[1],
             gblm(_ctx(W, stats, lin, nm=nm, cfg=GblmConfig()))[1]]
    for m in masks:
        groups = (~m).reshape(64, -1, nm[1]).sum(2)
        assert (groups == nm[0]).all()


def test_wanda_equals_magnitude_rows_when_norms_equal():
    W, _, _, lin = _layer()
    stats = LayerStats(lin, hessian=False)
    stats.add(torch.ones(1, 5, 256))
    assert torch.equal(wanda(_ctx(W, stats, lin, cfg=WandaConfig()))[1], row_mask(W.abs(), 0.5))


def test_gblm_with_zero_gradients_is_wanda_and_gradient_only_without_activations():
    W, X, stats, lin = _layer()
    zero = {"l": {"mean": torch.zeros_like(W), "sq": torch.zeros_like(W), "abs": torch.zeros_like(W), "n": 4}}
    assert torch.equal(gblm(_ctx(W, stats, lin, cfg=GblmConfig(), extra={"moments": zero}))[1],
                       wanda(_ctx(W, stats, lin, cfg=WandaConfig()))[1])
    sq = torch.rand(W.shape, generator=torch.Generator().manual_seed(1))
    mom = {"l": {"mean": torch.zeros_like(W), "sq": sq, "abs": sq.sqrt(), "n": 4}}
    dead = LayerStats(lin, hessian=False)
    dead.add(torch.zeros(1, 3, 256))
    got = gblm(_ctx(W, dead, lin, cfg=GblmConfig(), extra={"moments": mom}))[1]
    assert torch.equal(got, row_mask(W.abs() * 100 * (sq * 4).sqrt(), 0.5))


def test_sparsegpt_loss_identity_and_white_inputs():
    W, X, stats, lin = _layer()
    W_hat, mask, loss = sparsegpt(W, stats.H, 0.5)
    _, W0, Hd = inverse_hessian_factor(stats.H, W)
    D = (W0 - W_hat.double())
    assert loss == pytest.approx(0.5 * float(torch.trace(D @ Hd @ D.T)), rel=1e-6)
    # H = I and one block: the mask is the magnitude mask (per block = whole layer) and kept weights are unchanged
    W_hat, mask, _ = sparsegpt(W, torch.eye(256), 0.5, blocksize=256, percdamp=0.0)
    from weightlab.tensor.pruning import layer_mask

    assert torch.equal(mask, layer_mask(W.abs(), 0.5))
    assert torch.allclose(W_hat[mask], W[mask])


def test_lamp_scores_and_allocations():
    w = torch.tensor([[3.0, -1.0], [2.0, 0.5]])
    s = lamp_scores(w)
    assert s.max() == 1.0 and float(s[0, 0]) == 1.0
    assert float(s[1, 0]) == pytest.approx(4 / 13) and float(s[1, 1]) == pytest.approx(0.25 / 14.25)
    assert torch.equal(torch.argsort(s.reshape(-1)), torch.argsort(w.abs().reshape(-1)))  # same ranking
    assert torch.allclose(lamp_scores(5 * w), s)  # scale-invariant per layer
    big, small = torch.randn(50, 50) * 10, torch.randn(50, 50) * 0.01
    alloc = lamp({"a": big, "b": small}, 0.5)
    assert 0 < alloc["b"] < 1 and 0 < alloc["a"] < 1  # global magnitude would empty b
    assert sum(a * 2500 for a in alloc.values()) == pytest.approx(0.5 * 5000, abs=1)


def test_rd_dp_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    levels = torch.linspace(0, 1, 11)
    for trial in range(5):
        curves = [torch.cumsum(torch.rand(11, generator=g), 0) * (l + 1) for l in range(3)]
        curves = [c - c[0] for c in curves]
        sizes = [100, 200, 300]
        dp = rd_allocate(curves, sizes, levels, 0.5, unit=1)
        bf = brute_force(curves, sizes, levels, 0.5)
        cost = lambda p: sum(float(curves[l][j]) for l, j in enumerate(p))  # noqa: E731
        assert cost(dp) == pytest.approx(cost(bf), abs=1e-9)  # same optimum (ties may pick another argmin)


def test_row_mask_selection_equals_stable_sort_with_ties():
    """row_mask selects with kthvalue; it must prune exactly what a stable ascending sort would (ties to the
    lowest index), on heavily tied integer scores as well as continuous ones."""
    from weightlab.tensor.pruning import row_mask

    g = torch.Generator().manual_seed(0)
    for trial in range(100):
        r, c = torch.randint(1, 24, (2,), generator=g).tolist()
        x = torch.randint(0, 3, (r, c), generator=g).float() if trial % 2 else torch.randn(r, c, generator=g)
        for sp in (0.25, 0.5, 0.75):
            k = int(sp * c)
            ref = torch.ones(r, c, dtype=torch.bool)
            if k:
                ref.scatter_(1, torch.sort(x, dim=1, stable=True).indices[:, :k], False)
            assert torch.equal(row_mask(x, sp), ref)
