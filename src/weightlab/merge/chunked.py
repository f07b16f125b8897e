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
    """Which entries of |delta| a trim keeps: above a threshold, plus ties filled in index order.

    ``n_eq`` (the tensor's number of entries equal to the threshold, when known) lets a chunk
    use one comparison whenever the quota keeps all ties or none of them.
    """

    def __init__(self, thr: float, quota: int | None, n_eq: int | None = None):
        self.thr, self.quota, self.n_eq = thr, quota, n_eq  # quota None: keep every entry >= thr
        if quota is not None and n_eq is not None and quota >= n_eq:
            self.quota = None

    def start(self) -> "Selector":
        return Selector(self.thr, self.quota, self.n_eq)

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


MAX_WINDOW = 1 << 18  # bins of the one-pass exact histogram around the sampled threshold
MARGIN_SIGMAS = 8  # half-width of the sampled bracket, in standard deviations of the sample rank


def topk_selector(t: torch.Tensor, b: torch.Tensor, k: int, exact: bool) -> Selector:
    """Selector for the k largest |t - b| (float32 deltas), exact, usually in one pass.

    exact: keep exactly k (ties by index); otherwise keep every entry >= the k-th largest.
    The float bits of |delta| order like the floats. A strided sample brackets the bit
    pattern of the k-th largest (the estimate's rank +- 8 sigma); one pass counts the entries
    above the bracket and histograms every bit pattern inside it, which pins the exact
    threshold and its ties. If the bracket misses (or is too wide) a two-level radix select
    over the bits finds it instead; the result is exact either way.
    """
    ft, fb = flat(t), flat(b)
    n = ft.numel()
    if k <= 0:
        return Selector(float("inf"), None)
    if k >= n:
        return Selector(0.0, None)
    step = max(1, n // 65536)
    sample = abs_bits(ft[::step].float() - fb[::step].float()).sort().values
    m = sample.numel()
    p = k / n
    pos = m * (1 - p)  # ascending position of the k-th largest in the sample
    margin = MARGIN_SIGMAS * (m * p * (1 - p)) ** 0.5 + 2
    klo = int(sample[min(m - 1, max(0, int(pos - margin)))])
    khi = int(sample[min(m - 1, max(0, int(pos + margin) + 1))])
    found = None
    if 0 <= khi - klo < MAX_WINDOW:
        found = _bracket_counts(ft, fb, k, klo, khi)
    if found is None:
        found = _radix_counts(ft, fb, k)
    thr_bits, count_gt, n_eq = found
    thr = float(torch.tensor([thr_bits], dtype=torch.int32).view(torch.float32))
    if not exact:
        return Selector(thr, None)
    return Selector(thr, k - count_gt, n_eq)


def _bracket_counts(ft, fb, k: int, klo: int, khi: int):
    """(threshold bits, entries above it, entries equal) if the k-th largest lies in [klo, khi], else None."""
    width = khi - klo + 1
    hist = torch.zeros(width + 2, dtype=torch.int64)  # [below, klo..khi, above]
    for s, e in spans(ft.numel()):
        bits = abs_bits(ft[s:e].float() - fb[s:e].float())
        hist += torch.bincount((bits - (klo - 1)).clamp_(0, width + 1), minlength=width + 2)
    above = int(hist[-1])
    inside = hist[1:-1]
    if above >= k or above + int(inside.sum()) < k:
        return None
    j = threshold_from_counts(inside, k - above)
    return klo + j, above + int(inside[j + 1:].sum()), int(inside[j])


def _radix_counts(ft, fb, k: int):
    """The same by radix select: histogram the high 16 bits, then the low 16 bits of the threshold's bin."""
    hi = torch.zeros(65536, dtype=torch.int64)
    for s, e in spans(ft.numel()):
        hi += torch.bincount(abs_bits(ft[s:e].float() - fb[s:e].float()) >> 16, minlength=65536)
    hbin = threshold_from_counts(hi, k)
    above_hi = int(hi[hbin + 1:].sum())
    lo = torch.zeros(65536, dtype=torch.int64)
    for s, e in spans(ft.numel()):
        bits = abs_bits(ft[s:e].float() - fb[s:e].float())
        lo += torch.bincount(bits[(bits >> 16) == hbin] & 0xFFFF, minlength=65536)
    lbin = threshold_from_counts(lo, k - above_hi)
    return (hbin << 16) | lbin, above_hi + int(lo[lbin + 1:].sum()), int(lo[lbin])


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
            wd = t[s:e].float().sub_(bc)
            wd.mul_(sel.mask(wd.abs()))
            if w != 1.0:
                wd.mul_(w)
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
    """(sum of the agreeing entries, sum of the agreeing models' weights) per coordinate.

    |entry| * [agrees] is (entry * g) clamped at 0, summed in model order and signed at the
    end: bit-identical to summing the signed agreeing entries (negation is exact), fewer ops.
    """
    num = torch.zeros_like(g)
    den = torch.zeros_like(g)
    for wd, w in zip(wds, weights):
        p = (wd * g).clamp_min_(0)
        num += p
        agree = p > 0  # zero entries never agree
        if w == 1.0:
            den += agree
        else:
            den += agree * w
    return num.mul_(g), den
