"""Eigenvalue statistics of one weight matrix that need no matrix: the Marchenko-Pastur bulk and the
norms and ranks (``spectral`` computes the eigenvalues and re-exports these)."""
from __future__ import annotations

import math

import numpy as np


# ----------------------------------------------------------------------------- Marchenko-Pastur

def mp_bulk(evals: np.ndarray, n: int, m: int, max_iter: int = 100) -> dict:
    """Marchenko-Pastur bulk of an ESD of N x M matrices (N >= M), spikes removed iteratively.

    Under the MP law for i.i.d. entries of variance s^2, the eigenvalues of W^T W have mean
    s^2 N and lie in [s^2 (sqrt N - sqrt M)^2, s^2 (sqrt N + sqrt M)^2]. We estimate s^2 from the
    mean of the eigenvalues inside the current edge, drop those above it, and repeat until no
    eigenvalue leaves the bulk. Spikes are the eigenvalues above the final edge. (WeightWatcher's
    optional mp_fit fits s by a kernel-density brute-force search instead; this estimate is ours.)
    """
    ev = np.sort(np.asarray(evals, dtype=np.float64).reshape(-1))
    if len(ev) == 0 or n <= 0 or m <= 0 or ev[-1] <= 0:
        return {"mp_sigma": None, "mp_bulk_min": None, "mp_bulk_max": None, "num_spikes": None, "mp_softrank": None}
    k = len(ev)
    grow = (math.sqrt(n) + math.sqrt(m)) ** 2 / n
    for _ in range(max_iter):
        s2 = float(np.mean(ev[:k])) / n
        edge = s2 * n * grow
        k_new = int(np.searchsorted(ev, edge, side="right"))
        if k_new == k or k_new == 0:
            break
        k = k_new
    s2 = float(np.mean(ev[:max(k, 1)])) / n
    edge = s2 * (math.sqrt(n) + math.sqrt(m)) ** 2
    return {"mp_sigma": math.sqrt(s2), "mp_bulk_min": s2 * (math.sqrt(n) - math.sqrt(m)) ** 2, "mp_bulk_max": edge,
            "num_spikes": int(np.sum(ev > edge)), "mp_softrank": edge / float(ev[-1])}


# ----------------------------------------------------------------------------- ranks

EPS64 = 2.220446049250313e-16


def rounding_noise(eps: float, rms: float, shape: tuple[int, int], copies: int = 1) -> float:
    """Twice the expected spectral norm of the rounding error of storing an m x n matrix at precision eps.

    Round-to-nearest leaves errors uniform in +-ulp/2 (std ulp / sqrt 12, ulp ~ eps |w|); an m x n
    matrix of such errors has spectral norm about std (sqrt m + sqrt n). ``copies`` matrices of
    independent errors (e.g. a difference of two stored matrices) add in quadrature.
    """
    m, n = shape
    return 2.0 * math.sqrt(copies) * eps * rms * (math.sqrt(m) + math.sqrt(n)) / math.sqrt(12.0)


def rank_tolerance(smax: float, fro2: float, shape: tuple[int, int], eps: float, copies: int = 1) -> float:
    """Singular values at or below this are indistinguishable from zero.

    The larger of two floors: what the float64 Gram route resolves (its eigenvalues are accurate to
    about max(m, n) * eps64 * s_max^2, so singular values to s_max * sqrt(max(m, n) * eps64), about
    4e-7 s_max for a 576-wide matrix), and the rounding noise of the precision the weights are
    stored in (``rounding_noise``): a bfloat16 matrix carries no information below its own rounding.
    """
    m, n = shape
    rms = math.sqrt(max(fro2, 0.0) / max(1, m * n))
    return max(smax * math.sqrt(max(m, n) * EPS64), rounding_noise(eps, rms, shape, copies))


def rank_metrics(evals: np.ndarray, shape: tuple[int, int], eps: float, fro2: float | None = None,
                 copies: int = 1) -> dict:
    """Norms and ranks from the squared singular values of an m x n matrix stored at precision ``eps``.

    - stable rank ||W||_F^2 / ||W||_2^2;
    - numerical rank: singular values above ``rank_tolerance`` (the float64 Gram route's resolution
      or the storage rounding noise, whichever is larger);
    - effective rank exp(H(p)), p_i = s_i / sum s over those singular values (Roy & Vetterli): n for
      I_n, 1 for rank one, invariant to scale;
    - participation ratio (sum s^2)^2 / sum s^4.
    """
    lam = np.clip(np.asarray(evals, dtype=np.float64), 0.0, None)
    fro2 = float(np.sum(lam)) if fro2 is None else float(fro2)
    lmax = float(lam.max()) if len(lam) else 0.0
    if lmax <= 0.0:
        return {"frobenius_norm": math.sqrt(max(fro2, 0.0)), "spectral_norm": 0.0, "stable_rank": 0.0,
                "effective_rank": 0.0, "numerical_rank": 0, "participation_ratio": 0.0}
    s = np.sqrt(lam)
    smax = math.sqrt(lmax)
    tol = rank_tolerance(smax, fro2, shape, eps, copies)
    p = s[s > tol]  # at or below the tolerance a singular value is rounding noise, i.e. zero
    p = p / p.sum()
    erank = float(np.exp(-np.sum(p * np.log(p))))
    return {"frobenius_norm": math.sqrt(fro2), "spectral_norm": smax, "stable_rank": fro2 / lmax,
            "effective_rank": erank, "numerical_rank": int(np.sum(s > tol)),
            "participation_ratio": float(np.sum(lam)) ** 2 / float(np.sum(lam * lam))}
