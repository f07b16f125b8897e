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
            n_eq = int(eq.sum())
            if n_eq <= self.quota:  # every tie in this chunk fits: no prefix count needed
                keep |= eq
                self.quota -= n_eq
            else:
                keep[eq.nonzero().squeeze(1)[: self.quota]] = True
                self.quota = 0
        return keep


WINDOW = 3  # high-bit bins on each side of the sampled estimate whose low bits the first pass records


def topk_selector(t: torch.Tensor, b: torch.Tensor, k: int, exact: bool) -> Selector:
    """Selector for the k largest |t - b| (float32 deltas) via radix select on the float bits.

    exact: keep exactly k (ties by index); otherwise keep every entry >= the k-th largest.
    A strided sample estimates which high-16-bit bin holds the threshold; the first pass
    histograms the high bits and, for a few bins around the estimate, the low bits too, so
    a second pass is needed only when the estimate misses (the result is exact either way).
    """
    ft, fb = flat(t), flat(b)
    n = ft.numel()
    if k <= 0:
        return Selector(float("inf"), None)
    if k >= n:
        return Selector(0.0, None)
    step = max(1, n // 65536)
    sample = abs_bits(ft[::step].float() - fb[::step].float())
    rank = min(sample.numel() - 1, max(0, int(k / n * sample.numel())))
    est = int(torch.kthvalue(sample, sample.numel() - rank).values) >> 16
    lo_bin, width = max(0, est - WINDOW), 2 * WINDOW + 1
    hi = torch.zeros(65536, dtype=torch.int64)
    win = torch.zeros(width * 65536, dtype=torch.int64)
    for s, e in spans(n):
        bits = abs_bits(ft[s:e].float() - fb[s:e].float())
        top = bits >> 16
        hi += torch.bincount(top, minlength=65536)
        near = bits[(top >= lo_bin) & (top < lo_bin + width)]
        win += torch.bincount(((near >> 16) - lo_bin) * 65536 + (near & 0xFFFF), minlength=width * 65536)
    hbin = threshold_from_counts(hi, k)
    above_hi = int(hi[hbin + 1:].sum())
    if lo_bin <= hbin < lo_bin + width:
        lo = win[(hbin - lo_bin) * 65536:(hbin - lo_bin + 1) * 65536]
    else:  # the sample's estimate missed: one more pass for the low bits of the true bin
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
    """TIES' elect + disjoint merge in one pass over float32 chunks, given each model's trim selector.

    With zero_sign="majority" a coordinate whose weighted sum is exactly 0 takes the sign of
    the tensor's elected-sign total, known only at the end: such coordinates (rare) are kept
    aside and finished after the pass.
    """
    n = base.numel()
    ts, b, o = [flat(t) for t in tensors], flat(base), flat(out)
    sels = [s.start() for s in selectors]
    total = 0
    deferred = []  # (positions, base values, weighted trimmed deltas T x m)
    for s, e in spans(n):
        bc = b[s:e].float()
        wds = []
        acc = torch.zeros(e - s, dtype=torch.float32)
        for t, w, sel in zip(ts, weights, sels):
            d = t[s:e].float() - bc
            wd = (d * sel.mask(d.abs())) * w
            acc += wd
            wds.append(wd)
        if zero_sign == "positive":
            g = torch.where(acc >= 0, 1.0, -1.0)
        else:
            g = torch.sign(acc)
            total += int(g.sum())
            zero = (g == 0).nonzero().squeeze(1)
            if zero.numel():
                deferred.append((zero + s, bc[zero], torch.stack([wd[zero] for wd in wds])))
        num, den = _disjoint(wds, weights, g)
        if normalize:
            den[den == 0] = 1
            num /= den
        o[s:e] = bc + lam * num if lam != 1.0 else bc + num
    if deferred:
        majority = 1.0 if total >= 0 else -1.0
        for pos, bc, wd in deferred:
            num, den = _disjoint(list(wd), weights, torch.full_like(bc, majority))
            if normalize:
                den[den == 0] = 1
                num /= den
            o[pos] = (bc + lam * num if lam != 1.0 else bc + num).to(o.dtype)
    return out


def _disjoint(wds: list[torch.Tensor], weights: list[float], g: torch.Tensor):
    num = torch.zeros_like(g)
    den = torch.zeros_like(g)
    for wd, w in zip(wds, weights):
        agree = (wd * g) > 0  # zero entries never agree
        num += wd * agree
        den += agree * w
    return num, den
