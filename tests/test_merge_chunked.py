"""The fused chunked paths (used for 16-bit inputs) equal the plain rules bit for bit."""
import pytest
import torch

from weightlab.merge import chunked
from weightlab.merge.combine import disjoint_merge, weighted_sum
from weightlab.merge.context import make_context
from weightlab.merge.linear import LinearConfig, linear
from weightlab.merge.task_arithmetic import TaskArithmeticConfig, task_arithmetic
from weightlab.merge.ties import TiesConfig, ties, trim


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK", 997)  # many chunks, ties spread across chunk boundaries


def _inputs(seed=0, n=(60, 50), T=3, coarse=True):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).bfloat16()
    # coarse deltas: many exactly equal magnitudes, so tie-filling matters
    ts = [(base.float() + (torch.randint(-4, 5, n, generator=g).float() * 0.01 if coarse
                           else 0.01 * torch.randn(n, generator=g))).bfloat16() for _ in range(T)]
    return ts, base


@pytest.mark.parametrize("trim_mode", ["topk", "reference"])
@pytest.mark.parametrize("zero_sign", ["majority", "positive"])
@pytest.mark.parametrize("coarse", [True, False])
@pytest.mark.parametrize("route", ["bracket", "radix", "missed-bracket"])
def test_ties_chunked_equals_plain(trim_mode, zero_sign, coarse, route, monkeypatch):
    # the threshold search has three routes: the sampled bracket, the radix fallback when the
    # bracket is too wide, and the fallback when a (deliberately tiny) bracket misses
    if route == "radix":
        monkeypatch.setattr(chunked, "MAX_WINDOW", 0)
    else:  # these small tensors are sampled whole: a +-2 bracket always holds the threshold and stays narrow
        monkeypatch.setattr(chunked, "MARGIN_SIGMAS", 0)
    if route == "missed-bracket":  # shift the bracket wholly above / below the true threshold
        real, calls = chunked._bracket_counts, []

        def shifted(ft, fb, k, klo, khi):
            lo, hi = (khi + 1, khi + 10) if len(calls) % 2 == 0 else (max(0, klo - 10), klo - 1)
            calls.append(real(ft, fb, k, lo, hi))
            return calls[-1]
        monkeypatch.setattr(chunked, "_bracket_counts", shifted)
    ts, base = _inputs(coarse=coarse)
    cfg = TiesConfig(density=0.3, trim=trim_mode, zero_sign=zero_sign, **{"lambda": 0.7})
    w = [1.0, 0.5, 2.0]
    ctx = make_context("w", cfg, weights=w, n=3)
    ctx.dtype, ctx.out_dtype = torch.float32, torch.float32
    fast = ties(ts, base, ctx)
    b = base.float()
    plain = b + 0.7 * disjoint_merge([trim(t.float() - b, 0.3, trim_mode) for t in ts], w, zero_sign, True)
    assert torch.equal(fast, plain)
    if route == "missed-bracket":
        assert calls and all(c is None for c in calls)  # every shifted bracket missed; the fallback answered


def test_topk_keeps_exactly_k_with_index_order_ties():
    x = torch.tensor([1.0, 3, 2, 3, 3, 0.5])
    from weightlab.tensor import topk_mask

    assert topk_mask(x, 0.5).tolist() == [False, True, False, True, True, False]  # k = 3
    assert topk_mask(x, 2 / 6).tolist() == [False, True, False, True, False, False]  # tie at 3: lowest indices


def test_linear_and_task_arithmetic_chunked_equal_plain():
    ts, base = _inputs(coarse=False)
    ctx = make_context("w", LinearConfig(), weights=[0.5, 0.3, 0.2], n=3)
    ctx.dtype, ctx.out_dtype = torch.float32, torch.bfloat16
    assert torch.equal(linear(ts, None, ctx), weighted_sum([t.float() for t in ts], [0.5, 0.3, 0.2], True).bfloat16())
    ctx = make_context("w", TaskArithmeticConfig(**{"lambda": 0.4}), weights=[1.0, -1.0, 0.5], n=3)
    ctx.dtype, ctx.out_dtype = torch.float32, torch.float32
    b = base.float()
    expect = b + 0.4 * weighted_sum([t.float() - b for t in ts], [1.0, -1.0, 0.5])
    assert torch.equal(task_arithmetic(ts, base, ctx), expect)
