"""Merge rules proven on hand-computed cases and exact identities (method notes M1-M4, M6, M9, M11)."""
import math

import pytest
import torch

import weightlab as wl
from weightlab.merge.context import make_context
from weightlab.merge.dare import DareConfig, dare, drop_and_rescale
from weightlab.merge.ties import TiesConfig, ties
from weightlab.merge.tsv import tsv_merge_matrix
from weightlab.tensor import kth_largest_abs, polar_factor

TAUS = [[3, -1, 0.5, -2, 0.1], [-4, 2, 0.2, -1, 0.3], [2, 3, -0.1, 0.5, -0.2]]


def _ties(trim, scope="tensor", **kw):
    taus = [{"w": torch.tensor(t)} for t in TAUS]
    return wl.merge("ties", taus, base={"w": torch.zeros(5)}, density=0.4, trim=trim, scope=scope, **kw)["w"]


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_ties_hand_computed_exact_topk(scope):
    # keep exactly 2 per row -> [3,0,0,-2,0], [-4,2,0,0,0], [2,3,0,0,0]; gamma = [+,+,+,-,+]
    assert torch.allclose(_ties("topk", scope), torch.tensor([2.5, 2.5, 0, -2, 0]))


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_ties_hand_computed_reference_trim(scope):
    # the reference's kthvalue rule keeps 3 per row -> coordinate 4 becomes mean(-2, -1)
    assert torch.allclose(_ties("reference", scope), torch.tensor([2.5, 2.5, 0, -1.5, 0]))


def test_ties_lambda_base_and_weights():
    base = torch.tensor([1.0, 1, 1, 1, 1])
    sds = [{"w": base + torch.tensor(t)} for t in TAUS]
    out = wl.merge("ties", sds, base={"w": base}, density=0.4, lambda_=0.5)["w"]
    assert torch.allclose(out, base + 0.5 * torch.tensor([2.5, 2.5, 0, -2, 0]))
    # weights: the disjoint mean becomes weighted (model 1 weighted 3x): coord 0 -> (3*3 + 2)/4
    out = wl.merge("ties", sds, base={"w": base}, weights=[3, 1, 1], density=0.4)["w"]
    assert math.isclose(float(out[0] - 1), (3 * 3 + 2) / 4, rel_tol=1e-6)


def test_ties_zero_sign_rules():
    # coordinate sums to exactly 0: majority of the tensor's elected signs (-) vs mergekit's +
    t1, t2 = torch.tensor([1.0, -2, -3]), torch.tensor([-1.0, -1, -1])
    base = torch.zeros(3)
    cfg = TiesConfig(density=1.0, zero_sign="majority")
    out = ties([t1, t2], base, make_context("w", cfg, n=2))
    assert torch.allclose(out, torch.tensor([-1.0, -1.5, -2]))
    cfg = TiesConfig(density=1.0, zero_sign="positive")
    assert torch.allclose(ties([t1, t2], base, make_context("w", cfg, n=2)), torch.tensor([1.0, -1.5, -2]))


def test_global_trim_differs_from_per_tensor():
    base = {"a": torch.zeros(4), "b": torch.zeros(4)}
    m = {"a": torch.tensor([10.0, 9, 8, 7]), "b": torch.tensor([1.0, 0.5, 0.2, 0.1])}
    glob = wl.merge("ties", [m], base=base, density=0.5, scope="global")
    per = wl.merge("ties", [m], base=base, density=0.5, scope="tensor")
    assert torch.equal(glob["a"], m["a"]) and torch.equal(glob["b"], torch.zeros(4))
    assert torch.equal(per["a"], torch.tensor([10.0, 9, 0, 0])) and torch.equal(per["b"], torch.tensor([1.0, .5, 0, 0]))


def test_kth_largest_abs_exact():
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(3000, generator=g) * s for s in (1e-3, 1.0, 50.0)]
    allv = torch.sort(torch.cat(parts).abs(), descending=True).values
    for k in (1, 17, 4500, 9000):
        assert kth_largest_abs(lambda: iter(parts), k) == float(allv[k - 1])


def test_task_arithmetic_identities():
    g = torch.Generator().manual_seed(0)
    b = {"w": torch.randn(6, 4, generator=g), "n": torch.tensor(5)}
    t = {"w": b["w"] + 0.1 * torch.randn(6, 4, generator=g), "n": torch.tensor(9)}
    assert torch.equal(wl.merge("task-arithmetic", [t], base=b)["w"], t["w"])  # lambda 1, T=1: bit-exact
    assert torch.equal(wl.merge("task-arithmetic", [t], base=b, lambda_=0.0)["w"], b["w"])
    half = wl.merge("task-arithmetic", [t], base=b, lambda_=0.5)
    assert torch.allclose(half["w"] - b["w"], 0.5 * (t["w"] - b["w"]), atol=1e-6)
    neg = wl.merge("task-arithmetic", [t], base=b, weights=[-1.0])
    assert torch.allclose(neg["w"], b["w"] - (t["w"] - b["w"]), atol=1e-6)
    assert torch.equal(half["n"], b["n"])  # integer buffers come from the base, never averaged


def test_bf16_inputs_task_arithmetic_bit_exact():
    g = torch.Generator().manual_seed(0)
    b = {"w": torch.randn(64, 64, generator=g).bfloat16()}
    t = {"w": (b["w"].float() + 0.01 * torch.randn(64, 64, generator=g)).bfloat16()}
    assert torch.equal(wl.merge("task-arithmetic", [t], base=b)["w"], t["w"])


def test_uniform_soup_is_stacked_mean():
    g = torch.Generator().manual_seed(0)
    sds = [{"w": torch.randn(5, 7, generator=g), "b": torch.randn(7, generator=g), "n": torch.tensor(i)}
           for i in range(4)]
    out = wl.merge("linear", sds)
    for k in ("w", "b"):
        assert torch.allclose(out[k], torch.stack([s[k] for s in sds]).mean(0), atol=1e-6)
    assert int(out["n"]) == 0  # from the first model (the reference when there is no base)
    weighted = wl.merge("linear", sds[:2], weights=[3, 1])
    assert torch.allclose(weighted["w"], (3 * sds[0]["w"] + sds[1]["w"]) / 4, atol=1e-6)


def test_dare_statistics_and_identity():
    tau = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drop_and_rescale(tau, 1.0), tau)  # p = 0
    g = torch.Generator().manual_seed(3)
    out = drop_and_rescale(tau, 0.1, generator=g)  # p = 0.9
    assert abs(float((out == 0).float().mean()) - 0.9) < 0.01
    kept = out != 0
    assert torch.allclose(out[kept], tau[kept] / 0.1)
    # E[tau~] = tau: average of 2000 draws within 3 sigma on a small vector
    small = torch.tensor([1.0, -2.0, 0.5, 3.0])
    draws = torch.stack([drop_and_rescale(small, 0.5, generator=torch.Generator().manual_seed(s)) for s in range(2000)])
    sigma = small.abs() / math.sqrt(2000)  # per-draw std of x*Bernoulli(.5)/.5 is |x|
    assert bool(((draws.mean(0) - small).abs() <= 3 * sigma).all())


def test_dare_magnitude_variant_and_l1_rescale():
    out = drop_and_rescale(torch.tensor([1.0, -5, 0.1, 3]), 0.5, drop="magnitude")
    assert torch.equal(out, torch.tensor([0.0, -5, 0, 3]) * 2)
    x = torch.tensor([1.0, -5, 0.1, 3])
    l1 = drop_and_rescale(x, 0.5, drop="magnitude", rescale="l1")
    assert math.isclose(float(l1.abs().sum()), float(x.abs().sum()), rel_tol=1e-6)


def test_dare_is_seeded_per_tensor():
    base = {"w": torch.zeros(1000)}
    m = {"w": torch.randn(1000, generator=torch.Generator().manual_seed(0))}
    a = wl.merge("dare", [m], base=base, seed=7)
    b = wl.merge("dare", [m], base=base, seed=7)
    c = wl.merge("dare", [m], base=base, seed=8)
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])


def test_dare_ties_combination():
    base = torch.zeros(5)
    taus = [torch.tensor(t) for t in TAUS]
    cfg = DareConfig(density=1.0, combine="ties", normalize=True)
    out = dare(taus, base, make_context("w", cfg, n=3))
    # no drop: the sign-elected disjoint mean of the untrimmed vectors
    assert torch.allclose(out, torch.tensor([2.5, 2.5, 0.35, -1.5, 0.2]), atol=1e-6)


def _orthogonal_tasks(m=32, n=24, T=3, k=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    qu, _ = torch.linalg.qr(torch.randn(m, T * k, generator=g, dtype=torch.float64))
    qv, _ = torch.linalg.qr(torch.randn(n, T * k, generator=g, dtype=torch.float64))
    deltas = []
    for i in range(T):
        s = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
        deltas.append(qu[:, i * k:(i + 1) * k] @ torch.diag(s) @ qv[:, i * k:(i + 1) * k].T)
    return deltas


def test_tsv_equals_plain_sum_on_orthogonal_rank_k_tasks():
    deltas = _orthogonal_tasks()
    merged = tsv_merge_matrix(deltas, 8)
    assert torch.allclose(merged, sum(deltas), atol=1e-12)


def test_tsv_single_task_is_identity_and_polar_is_orthonormal():
    d = _orthogonal_tasks(T=1, k=8)[0]
    assert torch.allclose(tsv_merge_matrix([d], 24), d, atol=1e-12)
    u = polar_factor(torch.randn(30, 12, dtype=torch.float64))
    assert torch.allclose(u.T @ u, torch.eye(12, dtype=torch.float64), atol=1e-12)


def test_tsv_drops_null_triplets():
    # rank 4 < k = 8: the zero-sigma vectors are arbitrary and must not perturb the merge
    deltas = _orthogonal_tasks(k=8)
    low = []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        low.append(u[:, :4] @ torch.diag(s[:4]) @ vh[:4])
    merged = tsv_merge_matrix(low, 8)
    assert torch.allclose(merged, sum(low), atol=1e-9)


def test_tsv_m_through_engine_mean_for_vectors():
    base = {"w": torch.zeros(32, 24, dtype=torch.float64), "b": torch.zeros(24, dtype=torch.float64)}
    deltas = _orthogonal_tasks()
    sds = [{"w": d, "b": torch.full((24,), float(i), dtype=torch.float64)} for i, d in enumerate(deltas)]
    out = wl.merge("tsv-m", sds, base=base)
    assert torch.allclose(out["w"], sum(deltas), atol=1e-10)
    assert torch.allclose(out["b"], torch.full((24,), 1.0, dtype=torch.float64))  # mean of 0, 1, 2
