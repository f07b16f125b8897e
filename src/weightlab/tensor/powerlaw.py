"""WeightWatcher-style power-law fit of an eigenvalue spectrum (WeightWatcher 0.7.7 conventions).

Eigenvalues above 1e-5 are fitted; every one of them except the largest is tried as xmin; the
continuous MLE alpha = 1 + n / sum(ln(x / xmin)) and the KS distance
D = max |1 - (x / xmin)^(1 - alpha) - (0, 1, ..., n-1) / n| over the tail; the xmin with the
smallest D wins (the first on ties). Below 20 eigenvalues WeightWatcher's small-N variant
(bias-corrected alpha, tails of at least 8). The scan is vectorised and, for large spectra,
pruned with exact lower bounds; it returns the same xmin as WeightWatcher's loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EVALS_THRESH = 1e-5  # WeightWatcher's EVALS_THRESH: eigenvalues at or below are not fitted
SMALL_N = 20  # WeightWatcher's SMALL_N_CUTOFF
SMALL_N_MIN_TAIL = 8
_CHUNK = 1 << 21  # elements per block of the KS scan (16 MiB of float64)


@dataclass
class PowerLawFit:
    """A power-law fit of the tail of an ESD. ``status`` is "ok", "small-n" or "failed"."""

    status: str
    alpha: float | None = None
    xmin: float | None = None
    xmax: float | None = None
    D: float | None = None
    sigma: float | None = None
    n_tail: int = 0  # eigenvalues >= xmin (WeightWatcher's num_pl_spikes)
    n_fitted: int = 0  # eigenvalues above the 1e-5 threshold
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def _ks_rows(logx: np.ndarray, alphas: np.ndarray, idx: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
    """KS distance of the fits at candidates ``idx`` (xmin = x[i]), over all tail points or only ``cols``.

    WeightWatcher's convention: D_i = max_{j >= i} |1 - (x_j / x_i)^(1 - alpha_i) - (j - i) / n_i|.
    Restricted to a subset of columns the result is a lower bound of D_i.
    """
    n_all = len(logx)
    out = np.empty(len(idx))
    if cols is None:
        cols = np.arange(n_all)
    rows = min(_ROWS, max(1, _CHUNK // max(1, len(cols))))
    for r0 in range(0, len(idx), rows):
        ii = idx[r0:r0 + rows]
        cc = cols[cols >= ii.min()]
        a = alphas[ii]
        dl = logx[None, cc] - logx[ii, None]  # ln(x_j / x_i); negative for j < i
        np.multiply(dl, (1.0 - a)[:, None], out=dl)
        with np.errstate(over="ignore"):  # overflow only where j < i, masked below
            np.exp(dl, out=dl)  # 1 - theoretical CDF
        n = (n_all - ii).astype(np.float64)
        dl += (cc[None, :] - ii[:, None]) / n[:, None]  # + empirical CDF (0, 1/n, ..., (n-1)/n)
        np.subtract(1.0, dl, out=dl)
        np.abs(dl, out=dl)
        dl[cc[None, :] < ii[:, None]] = 0.0  # points below the candidate are not in its tail
        out[r0:r0 + rows] = dl.max(axis=1)
    return out


_ROWS = 64  # candidates per block of the exact scan (keeps the work near the triangle j >= i)
_FULL_SCAN = 20_000  # candidates x points below which every D is computed directly
_BLOCK = 16


def _ks_argmin(logx: np.ndarray, alphas: np.ndarray, valid: np.ndarray) -> tuple[int, np.ndarray | None, float]:
    """The candidate with the smallest KS distance (first one on ties; invalid candidates count as D = 1).

    Small ESDs: every D computed. Large ones (pooled conv ESDs reach 15,000 eigenvalues): a lower
    bound of every D from ~2 sqrt(n) evenly spaced points first, then exact D in order of
    increasing bound until the bound exceeds the best exact D. The answer is the same as the
    full scan's (a candidate is skipped only when its bound, hence its D, is larger than the
    best D found).
    Returns (index, all D or None when pruned, D at the index).
    """
    n_all = len(logx)
    cands = n_all - 1
    vidx = np.flatnonzero(valid)
    if cands * n_all <= _FULL_SCAN:
        d = np.ones(cands)
        if len(vidx):
            d[vidx] = _ks_rows(logx, alphas, vidx)
        best = int(np.argmin(d))
        return best, d, float(d[best])
    step = max(1, n_all // max(32, int(2 * math.sqrt(n_all))))
    cols = np.unique(np.r_[np.arange(0, n_all, step), n_all - 1])
    lb = np.ones(cands)
    if len(vidx):
        lb[vidx] = _ks_rows(logx, alphas, vidx, cols)
    order = np.argsort(lb, kind="stable")
    best, best_d = -1, math.inf
    for b0 in range(0, cands, _BLOCK):
        blk = order[b0:b0 + _BLOCK]
        if lb[blk[0]] > best_d:
            break
        ok = valid[blk]
        d = np.ones(len(blk))
        if ok.any():
            d[ok] = _ks_rows(logx, alphas, blk[ok])
        for i, di in zip(blk.tolist(), d.tolist()):
            if di < best_d or (di == best_d and i < best):
                best, best_d = i, di
    return best, None, best_d


def fit_power_law(evals: np.ndarray, thresh: float = EVALS_THRESH) -> PowerLawFit:
    """Fit p(x) ~ x^-alpha to the tail of ``evals`` exactly as WeightWatcher 0.7.7 does by default.

    Eigenvalues <= ``thresh`` are dropped; xmin is the candidate with the smallest KS distance.
    With fewer than 20 eigenvalues WeightWatcher switches to a bias-corrected alpha,
    1 + (n - 1) / sum ln(x / xmin), and only considers tails of at least 8 eigenvalues (its
    small-N objective is computed but then overridden by the smallest-D choice, which we
    reproduce); if no candidate qualifies the whole ESD is the tail.
    """
    ev = np.sort(np.asarray(evals, dtype=np.float64).reshape(-1))
    ev = ev[np.isfinite(ev)]
    data = ev[ev > thresh]
    n_data = len(data)
    if n_data < 2:
        return PowerLawFit("failed", n_fitted=n_data,
                           reason=f"{n_data} eigenvalue(s) above {thresh:g}; a fit needs at least 2")
    logx = np.log(data)
    suffix = np.cumsum(logx[::-1])[::-1]  # sum of ln x_j for j >= i
    n = (n_data - np.arange(n_data - 1)).astype(np.float64)
    s = suffix[:-1] - n * logx[:-1]  # sum over the tail of ln(x_j / x_i)
    small = n_data < SMALL_N
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if small:
            alphas = np.where(s > 1e-12, 1.0 + (n - 1.0) / s, 0.0)
            valid = (n >= SMALL_N_MIN_TAIL) & (s > 1e-12) & (alphas > 1.0)
        else:
            alphas = 1.0 + n / s
            valid = np.isfinite(alphas) & (alphas > 1.0)
    reason = f"only {n_data} eigenvalues: small-sample fit" if small else ""
    if small and not valid.any():
        # WeightWatcher's fallback: the whole ESD is the tail
        if s[0] <= 1e-12:
            return PowerLawFit("failed", n_fitted=n_data, reason="all eigenvalues equal: no power law to fit")
        alphas = alphas.copy()
        alphas[0] = 1.0 + (n_data - 1.0) / s[0]
        valid = np.zeros_like(valid)
        valid[0] = True
        reason = (f"only {n_data} eigenvalues: no xmin leaves a tail of {SMALL_N_MIN_TAIL}, "
                  "so the whole ESD was fitted")
    best, _, d_best = _ks_argmin(logx, alphas, valid)
    alpha = float(alphas[best])
    if not (math.isfinite(alpha) and alpha > 1.0):
        return PowerLawFit("failed", n_fitted=n_data, reason="no candidate xmin gives alpha > 1")
    xmin = float(data[best])
    return PowerLawFit("small-n" if small else "ok", alpha, xmin, float(data[-1]), d_best,
                       (alpha - 1.0) / math.sqrt(n_data - best), int(np.sum(ev >= xmin)), n_data, reason)


def log_alpha_norm(evals: np.ndarray, alpha: float) -> float:
    """log10 of sum(lambda^alpha), computed in log space (no overflow for large alpha)."""
    ev = np.asarray(evals, dtype=np.float64)
    ev = ev[ev > 0]
    if len(ev) == 0:
        return float("-inf")
    t = alpha * np.log(ev)
    m = float(t.max())
    return (m + math.log(float(np.sum(np.exp(t - m))))) / math.log(10.0)
