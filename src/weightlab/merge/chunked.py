"""Fused, chunked versions of the streaming rules' arithmetic.

Inputs stay in their storage dtype (bf16/fp16 memory-mapped views); each ~1M-element
chunk is converted, combined with in-place ops and written into the output, so no
full-size float32 copies or stacked (T x n) temporaries exist. Results equal the plain
rules' (the same operations in the same order per element).
"""
from __future__ import annotations

import torch

from ..tensor.masks import abs_bits, threshold_from_counts

CHUNK = 1 << 20


def spans(n: int, size: int = CHUNK):
    for s in range(0, n, size):
        yield s, min(n, s + size)


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def weighted_sum_into(out: torch.Tensor, parts: list[torch.Tensor], weights: list[float], dtype, base=None,
                      lam: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """out = [base +] lam * (sum_i w_i (parts_i [- base])) [/ sum w], chunk by chunk."""
    n = out.numel()
    o = flat(out)
    ps = [flat(p) for p in parts]
    b = flat(base) if base is not None else None
    div = sum(weights) if normalize and abs(sum(weights)) >= 1e-8 else None
    for s, e in spans(n):
        bc = b[s:e].to(dtype) if b is not None else None
        acc = torch.zeros(e - s, dtype=dtype)
        for p, w in zip(ps, weights):
            x = p[s:e].to(dtype)
            if bc is not None:
                x = x - bc
            acc.add_(x, alpha=w)
        if div is not None:
            acc /= div
        if bc is not None:
            acc = bc + lam * acc if lam != 1.0 else bc + acc
        o[s:e] = acc
    return out


class Selector:
    """Which entries of |delta| a trim keeps: above a threshold, plus ties filled in index order."""

    def __init__(self, thr: float, quota: int | None):
        self.thr, self.quota = thr, quota  # quota None: keep every entry >= thr

    def start(self) -> "Selector":
        return Selector(self.thr, self.quota)

    def mask(self, a: torch.Tensor) -> torch.Tensor:
        if self.quota is None:
            return a >= self.thr
        keep = a > self.thr
        if self.quota > 0:
            eq = a == self.thr
            c = eq.cumsum(0)
            keep |= eq & (c <= self.quota)
            self.quota -= min(int(c[-1]) if c.numel() else 0, self.quota)
        return keep


def topk_selector(t: torch.Tensor, b: torch.Tensor, k: int, exact: bool) -> Selector:
    """Selector for the k largest |t - b| (float32 deltas) via a two-pass radix select.

    exact: keep exactly k (ties by index); otherwise keep every entry >= the k-th largest.
    """
    ft, fb = flat(t), flat(b)
    n = ft.numel()
    if k <= 0:
        return Selector(float("inf"), None)
    if k >= n:
        return Selector(0.0, None)
    hi = torch.zeros(65536, dtype=torch.int64)
    for s, e in spans(n):
        hi += torch.bincount(abs_bits(ft[s:e].float() - fb[s:e].float()) >> 16, minlength=65536)
    hbin = threshold_from_counts(hi, k)
    above_hi = int(hi[hbin + 1:].sum())
    lo = torch.zeros(65536, dtype=torch.int64)
    for s, e in spans(n):
        bits = abs_bits(ft[s:e].float() - fb[s:e].float())
        lo += torch.bincount(bits[(bits >> 16) == hbin] & 0xFFFF, minlength=65536)
    lbin = threshold_from_counts(lo, k - above_hi)
    thr = float(torch.tensor([(hbin << 16) | lbin], dtype=torch.int32).view(torch.float32))
    if not exact:
        return Selector(thr, None)
    count_gt = above_hi + int(lo[lbin + 1:].sum())
    return Selector(thr, k - count_gt)


def ties_into(out: torch.Tensor, tensors: list[torch.Tensor], base: torch.Tensor, selectors: list[Selector],
              weights: list[float], zero_sign: str, normalize: bool, lam: float) -> torch.Tensor:
    """TIES' elect + disjoint merge over float32 chunks, given each model's trim selector."""
    n = base.numel()
    ts, b, o = [flat(t) for t in tensors], flat(base), flat(out)
    gamma = torch.empty(n, dtype=torch.int8)
    sels = [s.start() for s in selectors]
    total = 0
    for s, e in spans(n):
        bc = b[s:e].float()
        acc = torch.zeros(e - s, dtype=torch.float32)
        for t, w, sel in zip(ts, weights, sels):
            d = t[s:e].float() - bc
            acc += (d * sel.mask(d.abs())) * w
        g = torch.where(acc >= 0, 1, -1) if zero_sign == "positive" else torch.sign(acc)
        gamma[s:e] = g.to(torch.int8)
        total += int(g.sum())
    majority = 1 if total >= 0 else -1
    sels = [s.start() for s in selectors]
    for s, e in spans(n):
        bc = b[s:e].float()
        g = gamma[s:e].float()
        if zero_sign != "positive":
            g[g == 0] = majority
        num = torch.zeros(e - s, dtype=torch.float32)
        den = torch.zeros(e - s, dtype=torch.float32)
        for t, w, sel in zip(ts, weights, sels):
            d = t[s:e].float() - bc
            wd = d * sel.mask(d.abs()) * w
            agree = (wd * g) > 0
            num += wd * agree
            den += agree * w
        if normalize:
            den[den == 0] = 1
            num /= den
        o[s:e] = bc + lam * num if lam != 1.0 else bc + num
    return out
