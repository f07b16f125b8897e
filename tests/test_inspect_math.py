"""Spectral and filter math behind `weightlab inspect`: planted answers and WeightWatcher parity."""
import contextlib
import io
import math

import numpy as np
import pytest
import torch

from weightlab.tensor import filters as F
from weightlab.tensor import powerlaw as P
from weightlab.tensor import spectral as S


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Multi-threaded OpenBLAS crawls on a busy machine; these small problems do not need it."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


def pareto(n, alpha, xmin=1.0, seed=0):
    """Samples with density ~ x^-alpha above xmin (inverse CDF)."""
    u = np.random.default_rng(seed).random(n)
    return xmin * (1.0 - u) ** (-1.0 / (alpha - 1.0))


def orthogonal(n, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


# ----------------------------------------------------------------------------- power law

@pytest.mark.parametrize("alpha", [2.5, 3.0, 4.0])
def test_pareto_eigenvalues_give_the_planted_alpha(alpha):
    fit = S.fit_power_law(pareto(5000, alpha, xmin=0.3, seed=int(alpha * 10)))
    assert fit.status == "ok"
    assert abs(fit.alpha - alpha) < 0.15
    assert fit.D < 0.05 and fit.n_tail > 1000


def test_planted_alpha_through_a_matrix():
    """A 700 x 500 matrix whose squared singular values are Pareto(alpha=3): analyze recovers alpha."""
    from weightlab.inspect import analyze

    lam = np.sort(pareto(500, 3.0, xmin=0.5, seed=1))
    u, v = orthogonal(700, 2)[:, :500], orthogonal(500, 3)
    w = torch.from_numpy((u * np.sqrt(lam)) @ v.T).float()
    row = analyze({"layer.weight": w}, show_progress=False)[0]
    assert abs(row["alpha"] - 3.0) < 0.3
    assert row["num_evals"] == 500 and row["N"] == 700 and row["M"] == 500
    assert np.allclose(np.sort(S.matrix_eigenvalues(w.numpy())[0]), lam, rtol=1e-4)


def test_ww_small_n_fallback_and_failures():
    assert S.fit_power_law(np.array([3.0])).status == "failed"
    assert S.fit_power_law(np.array([1e-7, 1e-6, 2.0])).status == "failed"  # one eigenvalue above 1e-5
    small = S.fit_power_law(pareto(12, 3.0, seed=4))
    assert small.status == "small-n" and small.alpha > 1 and small.n_tail >= P.SMALL_N_MIN_TAIL
    tiny = S.fit_power_law(pareto(5, 3.0, seed=5))  # no tail of 8: the whole ESD
    assert tiny.status == "small-n" and tiny.n_tail == 5
    assert S.fit_power_law(np.full(30, 2.0)).status == "failed"


def test_pruned_ks_scan_is_exact(monkeypatch):
    rng = np.random.default_rng(7)
    for trial in range(40):
        n = int(rng.integers(150, 2500))
        x = [pareto(n, rng.uniform(1.5, 6), seed=trial), np.exp(rng.normal(0, 2, n)),
             rng.standard_normal(n) ** 2 * rng.random(n) + rng.random(n)][trial % 3]
        monkeypatch.setattr(P, "_FULL_SCAN", 10 ** 12)
        a = S.fit_power_law(x)
        monkeypatch.setattr(P, "_FULL_SCAN", 0)
        b = S.fit_power_law(x)
        assert (a.alpha, a.xmin, a.D) == (b.alpha, b.xmin, b.D)


@pytest.mark.slow  # importing weightwatcher alone takes seconds
def test_matches_weightwatcher_fit():
    """Same alpha, xmin and D as WeightWatcher's own fit (WWFit) on the same eigenvalues."""
    wwp = pytest.importorskip("weightwatcher.WW_powerlaw")
    rng = np.random.default_rng(11)
    for trial in range(60):
        n = int(rng.integers(6, 600))
        x = [pareto(n, rng.uniform(1.5, 6), seed=trial),
             np.linalg.svd(rng.standard_normal((n + 7, n)), compute_uv=False) ** 2,
             np.exp(rng.normal(0, 2, n))][trial % 3] * 10 ** rng.uniform(-3, 3)
        data = np.sort(x)
        data = data[data > S.EVALS_THRESH]
        with contextlib.redirect_stdout(io.StringIO()):
            ref = wwp.WWFit(data)
        got = S.fit_power_law(x)
        assert got.alpha == pytest.approx(ref.alpha, rel=1e-9, abs=1e-9)
        assert got.xmin == pytest.approx(ref.xmin, rel=1e-12)
        assert got.D == pytest.approx(ref.D, abs=1e-9)


def test_log_alpha_norm_no_overflow():
    ev = np.array([0.5, 2.0, 3e5])
    assert S.log_alpha_norm(ev, 2.0) == pytest.approx(math.log10(np.sum(ev ** 2.0)))
    assert math.isfinite(S.log_alpha_norm(ev, 80.0))  # 3e5^80 overflows float64


# ----------------------------------------------------------------------------- Gram route

def test_gram_blocks_equal_direct(monkeypatch):
    rng = np.random.default_rng(0)
    for shape in [(300, 40), (40, 300)]:
        x = rng.standard_normal(shape).astype(np.float32)
        direct = S.gram(x)
        monkeypatch.setattr(S, "_CHUNK", 97)
        assert np.allclose(S.gram(x), direct, rtol=1e-12, atol=1e-10)
        x0 = rng.standard_normal(shape).astype(np.float32)
        d = x.astype(np.float64) - x0
        want = d.T @ d if shape[0] >= shape[1] else d @ d.T
        assert np.allclose(S.gram_of_difference(x, x0), want)
        monkeypatch.undo()


def test_eigenvalues_match_svd_and_conv_slices():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((120, 70)).astype(np.float32)
    lam, fro2 = S.matrix_eigenvalues(x)
    sv = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    assert np.allclose(np.sort(lam), np.sort(sv ** 2), rtol=1e-10)
    assert fro2 == pytest.approx(float((x.astype(np.float64) ** 2).sum()))
    w = rng.standard_normal((8, 5, 3, 3))
    ev, n, m = S.conv_slice_eigenvalues(w)
    want = np.sort(np.concatenate([np.linalg.svd(w[:, :, i, j], compute_uv=False) ** 2
                                   for i in range(3) for j in range(3)]))
    assert (n, m) == (8, 5) and np.allclose(ev, want)


# ----------------------------------------------------------------------------- ranks

def test_effective_and_stable_rank():
    n = 50
    eye = torch.eye(n)
    assert S.effective_rank(eye) == pytest.approx(n)
    r = S.rank_metrics(S.matrix_eigenvalues(eye.numpy())[0], (n, n), S.dtype_eps(torch.float32))
    assert r["stable_rank"] == pytest.approx(n) and r["numerical_rank"] == n
    assert r["participation_ratio"] == pytest.approx(n)
    g = torch.Generator().manual_seed(0)
    one = torch.outer(torch.randn(40, generator=g), torch.randn(30, generator=g))
    assert S.effective_rank(one) == pytest.approx(1.0, abs=1e-6)
    a = torch.randn(60, 45, generator=g)
    assert S.effective_rank(a) == pytest.approx(S.effective_rank(7.5 * a), rel=1e-9)  # scale invariant
    low = (torch.randn(64, 5, generator=g) @ torch.randn(5, 48, generator=g))
    m = S.rank_metrics(S.matrix_eigenvalues(low.numpy())[0], (64, 48), S.dtype_eps(torch.float32))
    assert m["numerical_rank"] == 5


def test_mp_bulk_finds_planted_spikes():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((800, 400))
    lam = np.linalg.svd(x, compute_uv=False) ** 2
    mp = S.mp_bulk(lam, 800, 400)
    assert mp["num_spikes"] <= 2 and mp["mp_sigma"] == pytest.approx(1.0, rel=0.05)
    u, v = orthogonal(800, 4)[:, :3], orthogonal(400, 5)[:, :3]
    spiked = x + u @ np.diag([300.0, 250.0, 200.0]) @ v.T
    mp2 = S.mp_bulk(np.linalg.svd(spiked, compute_uv=False) ** 2, 800, 400)
    assert 3 <= mp2["num_spikes"] <= 5


# ----------------------------------------------------------------------------- intruders

def _separated_base(m=256, n=512, seed=0):
    rng = np.random.default_rng(seed)
    u, v = orthogonal(m, seed + 1), orthogonal(n, seed + 2)[:, :m]
    s = 10 * 0.97 ** np.arange(m)
    return (u * s) @ v.T, s, rng


@pytest.mark.parametrize("transpose", [False, True])
def test_rank_one_spike_is_exactly_one_intruder(transpose):
    w0, s, rng = _separated_base()
    noise = w0 + 0.01 * rng.standard_normal(w0.shape)
    uu = rng.standard_normal(w0.shape[0])
    vv = rng.standard_normal(w0.shape[1])
    spike = w0 + 5 * s[0] * np.outer(uu / np.linalg.norm(uu), vv / np.linalg.norm(vv))
    if transpose:  # the m > n branch: left vectors through x0 V / s
        w0, noise, spike = w0.T.copy(), noise.T.copy(), spike.T.copy()
    t = lambda a: torch.from_numpy(a).float()  # noqa: E731
    assert S.intruder_dimensions(t(noise), t(w0))["count"] == 0
    r = S.intruder_dimensions(t(spike), t(w0))
    assert r["count"] == 1
    mc = sorted(r["max_cos"])
    assert mc[0] < 0.5 and mc[1] > 0.9


# ----------------------------------------------------------------------------- conv filters

def test_filter_metrics_on_hand_made_filters():
    assert F.sparsity(np.zeros((64 * 16, 9)))[0] == 1.0
    assert F.sparsity(np.ones((64 * 16, 9)))[0] == 0.0
    w = np.ones((2, 1, 3, 3))
    w[0] = 0
    assert F.filter_quality(w)["sparsity"] == 0.5
    same = F.filter_quality(np.ones((64, 16, 3, 3)))
    assert same["variance_entropy"] == 0.0 and same["orthogonality"] == pytest.approx(0.0, abs=1e-12)
    assert F.filter_quality(0.1 * np.ones((64, 16, 3, 3)))["orthogonality"] == pytest.approx(0.0, abs=1e-12)
    rows = orthogonal(144, 6)[:64].reshape(64, 16, 3, 3)
    assert F.filter_quality(rows)["orthogonality"] == pytest.approx(1.0, abs=1e-9)
    g = np.random.default_rng(8).standard_normal((128, 128, 3, 3))
    q = F.filter_quality(g)
    assert q["variance_entropy"] == pytest.approx(math.log10(9), abs=0.01)
    assert q["variance_entropy_norm"] > 1 and "variance entropy near random" in " ".join(q["flags"])


def test_all_zero_layer_is_degenerate_not_orthogonal():
    q = F.filter_quality(np.zeros((16, 4, 3, 3)))
    assert q["orthogonality"] == 0.0  # ours: no live filters
    assert q["orthogonality_ref"] == pytest.approx(1 - 1 / 15)  # the reference's formula (its bug)
    assert q["sparsity"] == 1.0 and q["variance_entropy"] == 0.0
    assert any("sparse" in f for f in q["flags"]) and any("non-zero output" in f for f in q["flags"])


def test_variance_entropy_with_zero_variances_is_finite():
    # 4 filters in 9 dimensions: at most 3 non-zero principal variances (the reference gives NaN)
    w = np.random.default_rng(9).standard_normal((4, 1, 3, 3))
    ve = F.filter_quality(w)["variance_entropy"]
    assert math.isfinite(ve) and 0 < ve <= math.log10(3) + 1e-12
