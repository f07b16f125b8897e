"""R-TSVM / RESM: the outlier weights and layer ranks on planted cases, computed here by hand
(plain Python), and the identities with TSV-M (method note M6, docs/design.md "R-TSVM")."""
import math
import statistics

import pytest
import torch

import weightlab as wl
from weightlab.merge.rtsvm import layer_rank, outlier_weights, sparsity
from weightlab.merge.tsv import tsv_merge_matrix
from weightlab.tensor.linalg import excess_kurtosis

D = torch.float64


def _uniform(m, n, seed, zero_share=0.0):
    """Dense U[-1, 1] entries (no entry is beyond 3 sigma = 1.73) with an exact share zeroed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(m, n, generator=g, dtype=D) * 2 - 1
    x = torch.where(x.abs() < 0.05, torch.full_like(x, 0.5), x)  # keep nonzeros clear of the tolerance
    nz = round(zero_share * m * n)
    idx = torch.randperm(m * n, generator=g)[:nz]
    x.view(-1)[idx] = 0.0
    return x


def _merge(method, deltas, **kw):
    base = {"w": torch.zeros_like(deltas[0])}
    return wl.merge(method, [{"w": d} for d in deltas], base=base, **kw)["w"]


def test_one_planted_outlier_among_zeros_gets_kappa_over_sqrt19():
    # 19 zeros and one x: mu = x/20, sigma = x*sqrt(19)/20, |x - mu| = 19x/20 -> w = 3/sqrt(19)
    d = torch.zeros(4, 5, dtype=D)
    d[2, 3] = 7.0
    w = outlier_weights(d, 3.0)
    expect = torch.ones(4, 5, dtype=D)
    expect[2, 3] = 3 / math.sqrt(19)
    assert torch.allclose(w, expect, atol=1e-12)


def test_outlier_weights_match_a_plain_python_three_sigma_rule():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(12, 10, generator=g, dtype=D) * 0.1
    d[0, 0], d[5, 7], d[11, 2] = 2.0, -1.5, 0.9  # planted outliers
    vals = d.reshape(-1).tolist()
    mu, sd = statistics.fmean(vals), statistics.pstdev(vals)
    expect = [min(1.0, 3 * sd / abs(v - mu)) if abs(v - mu) > 3 * sd else 1.0 for v in vals]
    w = outlier_weights(d, 3.0).reshape(-1).tolist()
    assert w == pytest.approx(expect, abs=1e-12)
    outliers = [i for i, e in enumerate(expect) if e < 1]
    assert {0, 5 * 10 + 7, 11 * 10 + 2} <= set(outliers)


@pytest.mark.parametrize("zero_shares,expect_k", [
    ((0.0, 0.0), 8), ((0.5, 0.0), 6), ((0.75, 0.75), 2), ((0.5, 0.5), 4), ((0.9375, 1.0), 1)])
def test_layer_rank_from_planted_sparsity(zero_shares, expect_k):
    deltas = [_uniform(16, 16, seed=i, zero_share=z) for i, z in enumerate(zero_shares)]
    for d, z in zip(deltas, zero_shares):
        assert sparsity(d, 0.01) == pytest.approx(z)
    # hand formula: floor((1 - mean sparsity) * min(m, n) / T), at least 1
    assert max(1, math.floor((1 - sum(zero_shares) / 2) * 16 / 2 + 1e-9)) == expect_k
    assert layer_rank(deltas, 0.01) == expect_k


def test_merge_keeps_k_triplets_per_task_at_the_layer_rank():
    deltas = [_uniform(16, 16, seed=10, zero_share=0.5), _uniform(16, 16, seed=11)]  # k = 6 each
    merged = _merge("r-tsvm", deltas, outlier_weighting=False)
    assert int(torch.linalg.matrix_rank(merged)) == 12
    assert torch.allclose(merged, tsv_merge_matrix(deltas, 6), atol=1e-12)


def _provisional(deltas):
    """The old provisional rule (kurtosis task weights on S, per-task rank from 1% of max)."""
    T = len(deltas)
    w = [1.0 / (1.0 + max(0.0, excess_kurtosis(d))) for d in deltas]
    w = [x * T / sum(w) for x in w]
    ks = []
    for d in deltas:
        a = d.abs()
        rho = 1.0 - float((a < 0.01 * a.max()).float().mean())
        ks.append(min(max(1, round(rho * min(d.shape) / T)), min(d.shape) // T))
    return tsv_merge_matrix(deltas, ks, 1e-6, w)


def test_planted_outliers_and_sparsity_follow_the_rule_not_the_provisional_guess():
    a = _uniform(16, 16, seed=20, zero_share=0.5)
    a[1, 2], a[9, 9] = 12.0, -9.0  # outliers of task a
    b = _uniform(16, 16, seed=21)
    deltas = [a, b]
    # expected, computed by hand: Huber weights from the plain-Python 3-sigma rule, then one rank
    weighted = []
    for d in deltas:
        vals = d.reshape(-1).tolist()
        mu, sd = statistics.fmean(vals), statistics.pstdev(vals)
        w = [3 * sd / abs(v - mu) if abs(v - mu) > 3 * sd else 1.0 for v in vals]
        weighted.append(d * torch.tensor(w, dtype=D).reshape(d.shape))
    assert weighted[0][1, 2] < 12.0 and torch.equal(weighted[1], b)
    s = [sum(abs(v) <= 0.01 * max(abs(x) for x in d.reshape(-1).tolist()) for v in d.reshape(-1).tolist()) / 256
         for d in weighted]
    k = math.floor((1 - sum(s) / 2) * 8 + 1e-9)
    assert k == 6  # s_a ~ 0.5 (an outlier landed on a zero), s_b = 0: floor(0.75 * 8)
    expect = tsv_merge_matrix(weighted, k)
    got = _merge("r-tsvm", deltas)
    assert torch.allclose(got, expect, atol=1e-12)
    assert not torch.allclose(got, _provisional(deltas), atol=1e-3)


def test_equal_outlier_free_dense_tasks_equal_tsv_m():
    deltas = [_uniform(32, 24, seed=s) for s in range(3)]
    assert all(bool((outlier_weights(d, 3.0) == 1).all()) for d in deltas)
    assert torch.allclose(_merge("r-tsvm", deltas), _merge("tsv-m", deltas), atol=1e-12)


def test_one_task_gives_its_truncated_svd_at_the_layer_rank():
    d = _uniform(20, 12, seed=30, zero_share=0.25)  # T = 1: k = floor(0.75 * 12) = 9
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    assert torch.allclose(_merge("r-tsvm", [d]), u[:, :9] @ torch.diag(s[:9]) @ vh[:9], atol=1e-12)


def test_both_components_off_is_tsv_m_even_with_outliers_and_sparsity():
    a = _uniform(16, 16, seed=40, zero_share=0.6)
    a[0, 0] = 30.0
    deltas = [a, _uniform(16, 16, seed=41)]
    off = _merge("r-tsvm", deltas, outlier_weighting=False, sparsity_rank=False)
    assert torch.allclose(off, _merge("tsv-m", deltas), atol=1e-12)
    assert not torch.allclose(_merge("r-tsvm", deltas), off, atol=1e-3)


def test_registry_aliases_vectors_and_config_errors():
    assert wl.get_method("merge", "resm") is wl.get_method("merge", "r-tsvm")
    assert "not verified" in wl.get_method("merge", "r-tsvm").paper
    base = {"b": torch.zeros(5, dtype=D)}
    out = wl.merge("resm", [{"b": torch.full((5,), float(i), dtype=D)} for i in range(3)], base=base)
    assert torch.allclose(out["b"], torch.ones(5, dtype=D))  # non-matrices: mean of task vectors
    with pytest.raises(wl.ConfigError):
        _merge("r-tsvm", [_uniform(8, 8, 0)], kappa=0.0)
