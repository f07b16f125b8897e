"""Convolution filter quality (CNN Filter DB; Gavrikov & Keuper, CVPR 2022).

Definitions follow the reference implementation ``paulgavrikov/torchconvquality``
(``torchconvquality/__init__.py``), with two deliberate differences, both for degenerate input:

- Orthogonality is the mean |cos| over pairs of *distinct, non-zero* filters. The reference
  divides sum |G - I| by n(n-1), which counts the diagonal of every all-zero filter as 1
  (its Gram diagonal is 0, not 1): an all-zero layer scores 1 - 1/(n-1) ~ 0.98, "almost
  perfectly orthogonal". Here dead filters are left out; a layer with fewer than two live
  filters scores 0 (nothing independent in it) and is flagged. The reference's value is kept
  as ``orthogonality_ref`` for comparison with published numbers.
- Variance entropy uses 0 log 0 = 0. The reference sums p log10 p in torch, which gives NaN as
  soon as one principal variance is exactly 0 (e.g. fewer filters than kernel entries).
"""
from __future__ import annotations

import math

import numpy as np

SPARSITY_EPS = 0.01
# empirical variance entropy of random 3x3 filters as a function of their number n (reference)
_H_L, _H_X0, _H_K, _H_B = 1.2618047, 2.30436435, 0.88767525, -0.31050834
FLAG_SPARSITY = 0.1  # [ours] thresholds for the degenerate-layer flags
FLAG_VE_LOW = 0.5
FLAG_VE_RANDOM = 0.9


def random_entropy_level(n: int) -> float:
    """The reference's fitted variance entropy of n random 3x3 filters (the normaliser of VE)."""
    return _H_L / (1.0 + math.exp(-_H_K * (math.log2(max(n, 1)) - _H_X0))) + _H_B


def sparsity(filters: np.ndarray, eps: float = SPARSITY_EPS) -> tuple[float, np.ndarray]:
    """Share of filters whose every entry is below eps * max|w| (1 when all weights are 0). Returns (share, mask)."""
    a = np.abs(filters)
    t = float(a.max()) * eps if a.size else 0.0
    if t == 0.0:
        t = 1.0
    mask = np.all(a < t, axis=1)
    return (float(mask.mean()) if len(mask) else 0.0), mask


def variance_entropy(filters: np.ndarray) -> float:
    """Entropy (log10) of the principal-component variance shares of the filters (rows); 0 if they do not vary."""
    n = filters.shape[0]
    if n < 2:
        return 0.0
    c = np.asarray(filters, dtype=np.float64)
    c = c - c.mean(axis=0)
    var = np.clip(np.linalg.eigvalsh(c.T @ c), 0.0, None) / (n - 1)
    tot = var.sum()
    if tot <= 0:
        return 0.0
    p = var / tot
    p = p[p > 0]
    return float(-np.sum(p * np.log10(p)))


def orthogonality(w: np.ndarray) -> tuple[float | None, float | None, int]:
    """1 - mean |cos| between distinct non-zero output filters (rows of c_out x rest).

    Returns (ours, the reference's formula, number of all-zero filters).
    """
    rows = np.asarray(w, dtype=np.float64).reshape(w.shape[0], -1)
    n = rows.shape[0]
    norms = np.linalg.norm(rows, axis=1)
    dead = int(np.sum(norms == 0))
    if n < 2:
        return None, None, dead
    safe = np.where(norms == 0, 1.0, norms)
    unit = rows / safe[:, None]
    g = np.abs(unit @ unit.T)  # zero rows give zero rows and columns, so live pairs are all that is summed
    off = float(g.sum()) - float(np.trace(g))
    # the reference: sum |G - I| / (n (n - 1)); the diagonal of G is 1 for live filters and 0 for dead ones
    ref = 1.0 - (off + dead) / (n * (n - 1))
    k = n - dead
    if k < 2:
        return 0.0, ref, dead
    return 1.0 - off / (k * (k - 1)), ref, dead


def filter_quality(w: np.ndarray, sparsity_eps: float = SPARSITY_EPS) -> dict:
    """CNN Filter DB metrics of one conv weight (c_out, c_in, k_h, k_w).

    The normalised variance entropy (VE / random level) is defined for 3x3 kernels only (the
    reference's random-filter curve is for 9-entry filters); other kernel sizes get None.
    """
    co, ci, kh, kw = w.shape
    f = np.asarray(w, dtype=np.float64).reshape(co * ci, kh * kw)
    n = f.shape[0]
    sp, mask = sparsity(f, sparsity_eps)
    ve = variance_entropy(f)
    live = f[~mask]
    ve_clean = variance_entropy(live)
    is3x3 = kh * kw == 9
    level = random_entropy_level(n) if is3x3 else None
    level_clean = random_entropy_level(len(live)) if is3x3 and len(live) else None
    orth, orth_ref, dead = orthogonality(w)
    out = {
        "filters": n,
        "output_filters": co,
        "kernel": f"{kh}x{kw}",
        "sparsity": sp,
        "variance_entropy": ve,
        "variance_entropy_max": math.log10(kh * kw) if kh * kw > 1 else 0.0,
        "variance_entropy_norm": ve / level if level else None,
        "variance_entropy_clean": ve_clean,
        "variance_entropy_clean_norm": ve_clean / level_clean if level_clean else None,
        "orthogonality": orth,
        "orthogonality_ref": orth_ref,
        "dead_output_filters": dead,
    }
    out["flags"] = degenerate_flags(out)
    return out


def degenerate_flags(q: dict) -> list[str]:
    flags = []
    if q["sparsity"] > FLAG_SPARSITY:
        flags.append(f"sparse: {q['sparsity']:.0%} of filters are (near) zero")
    ven = q.get("variance_entropy_norm")
    if ven is not None and ven < FLAG_VE_LOW:
        flags.append(f"low variance entropy ({ven:.2f} of random): filters are alike")
    if ven is not None and ven > FLAG_VE_RANDOM:
        flags.append(f"variance entropy near random ({ven:.2f}): unstructured, untrained-looking filters")
    if q.get("output_filters", 0) >= 2 and q.get("dead_output_filters", 0) >= q["output_filters"] - 1:
        flags.append("fewer than two non-zero output filters")
    return flags
