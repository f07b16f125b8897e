"""One weight matrix's table rows: its spectrum (norms, ranks, WeightWatcher's ESD fit, Marchenko-Pastur
bulk, conv filter quality) and, with a base, what the change did (``analysis`` runs these per matrix)."""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from ..io.dtypes import dtype_name
from ..tensor import spectral as S
from ..tensor.filters import filter_quality
from .plan import _Item

if TYPE_CHECKING:
    from .analysis import DiffOptions, InspectConfig

SMALL_TAIL = 10
MP_MIN_M = 8

def _f(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _depth(name: str) -> int | None:
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def _spectral_row(it: _Item, w: np.ndarray, lam: np.ndarray, fro2: float,
                  cfg: InspectConfig, device=None) -> tuple[dict, np.ndarray]:
    x_shape = (it.shape[0], int(np.prod(it.shape[1:])))
    row: dict[str, Any] = {"name": it.name, "kind": it.kind, "shape": list(it.shape), "dtype": dtype_name(it.dtype),
                           "N": it.n, "M": it.m, "rf": it.rf}
    row.update({k: (_f(v) if isinstance(v, float) else v)
                for k, v in S.rank_metrics(lam, x_shape, S.dtype_eps(it.dtype), fro2).items()})
    if it.kind == "conv2d":
        # a 1x1 kernel has one slice, the matrix itself: its eigenvalues are already in hand
        esd = lam.copy() if it.rf == 1 else S.conv_slice_eigenvalues(w, device)[0]
        if cfg.conv2d_norm:
            esd *= 0.5
    else:
        esd = lam
    row["num_evals"] = int(len(esd))
    total, lmax = float(esd.sum()), float(esd[-1]) if len(esd) else 0.0
    row["log_norm"] = _f(math.log10(total)) if total > 0 else None
    row["log_spectral_norm"] = _f(math.log10(lmax)) if lmax > 0 else None
    row["lambda_max"] = lmax
    fit = S.fit_power_law(esd)
    warnings: list[str] = []
    if fit.ok:
        a = fit.alpha
        row.update({"alpha": a, "alpha_weighted": _f(a * row["log_spectral_norm"]) if row["log_spectral_norm"]
                    is not None else None, "log_alpha_norm": _f(S.log_alpha_norm(esd, a)), "xmin": fit.xmin,
                    "ks_distance": fit.D, "alpha_sigma": fit.sigma, "num_pl_spikes": fit.n_tail, "fit": fit.status})
        if fit.status == "small-n":
            warnings.append(fit.reason)
        if a < S.ALPHA_LOW:
            warnings.append(f"alpha {a:.2f} < {S.ALPHA_LOW:g}: very heavy tail (WeightWatcher: over-trained?)")
        elif a > S.ALPHA_HIGH:
            warnings.append(f"alpha {a:.2f} > {S.ALPHA_HIGH:g}: little heavy-tailed structure "
                            "(WeightWatcher: under-trained?)")
        if fit.n_tail < SMALL_TAIL and fit.status == "ok":
            warnings.append(f"power law fitted to only {fit.n_tail} eigenvalues: alpha is uncertain "
                            f"(+-{fit.sigma:.2f})")
    else:
        row.update({"alpha": None, "alpha_weighted": None, "log_alpha_norm": None, "xmin": None, "ks_distance": None,
                    "alpha_sigma": None, "num_pl_spikes": None, "fit": "failed"})
        warnings.append(f"power-law fit failed: {fit.reason}")
    # a Marchenko-Pastur bulk needs matrices of some size (depthwise kernels give 1 x N slices)
    mp = S.mp_bulk(esd, it.n, it.m) if it.m >= MP_MIN_M else dict.fromkeys(S.mp_bulk(np.zeros(0), 0, 0))
    row.update({k: (_f(v) if isinstance(v, float) else v) for k, v in mp.items()})
    full = min(x_shape)
    if row["numerical_rank"] < full:
        warnings.append(f"numerically rank-deficient: rank {row['numerical_rank']} of {full}")
    if it.kind == "conv2d" and it.rf > 1 and cfg.filters:
        q = filter_quality(w, cfg.sparsity_eps)
        for k, v in q.items():
            if k != "flags":
                row[f"filter_{k}"] = _f(v) if isinstance(v, float) else v
        row["filter_flags"] = q["flags"]
        warnings.extend(q["flags"])
    row["warnings"] = warnings
    return row, esd


def _diff_row(it: _Item, x: np.ndarray, g: S.GramSVD, x0: np.ndarray, base_dtype, opts: DiffOptions,
              device=None) -> dict:
    m, n = x.shape
    row: dict[str, Any] = {"name": it.name, "kind": it.kind, "shape": list(it.shape), "depth": _depth(it.name)}
    g0 = S.gram_svd(x0, device)
    base_norm = math.sqrt(max(g0.fro2, 0.0))
    gd = S.gram_of_difference(x, x0, device)
    fro2_d = float(np.trace(gd))
    row.update({"base_norm": base_norm, "delta_norm": math.sqrt(max(fro2_d, 0.0)),
                "rel_change": math.sqrt(max(fro2_d, 0.0)) / base_norm if base_norm > 0 else None})
    if fro2_d == 0.0:
        row.update({"status": "unchanged", "intruders": 0})
        return row
    row["status"] = "changed"
    lam_d = S.eigvalsh(gd, device)
    eps = max(S.dtype_eps(it.dtype), S.dtype_eps(base_dtype))
    # the change is exact (float64 difference of the stored values); what it cannot resolve is the
    # rounding noise of storing both matrices, at the scale of the weights (not of the change)
    rms = math.sqrt(max(g.fro2, 0.0) / (m * n))
    noise = S.rounding_noise(eps, rms, (m, n), copies=2)
    dm = S.rank_metrics(lam_d, (m, n), 0.0, fro2_d)
    s_d = np.sqrt(lam_d)
    tol = max(dm["spectral_norm"] * math.sqrt(max(m, n) * S.EPS64), noise)
    keep = s_d[s_d > tol]
    dm["numerical_rank"] = int(len(keep))
    if len(keep):
        p = keep / keep.sum()
        dm["effective_rank"] = float(np.exp(-np.sum(p * np.log(p))))
    else:
        dm["effective_rank"] = 0.0
    row.update({f"delta_{k}": (_f(v) if isinstance(v, float) else v) for k, v in dm.items()
                if k not in ("frobenius_norm",)})
    row["delta_above_rounding"] = dm["spectral_norm"] > noise
    s1, s01 = (g.s[0] if len(g.s) else 0.0), (g0.s[0] if len(g0.s) else 0.0)
    row["spectral_norm_change"] = _f(s1 / s01 - 1.0) if s01 > 0 else None
    k = min(opts.k, min(m, n))
    y = S.top_left_vectors(x, g, k)
    tol0 = S.rank_tolerance(s01, g0.fro2, (m, n), S.dtype_eps(base_dtype))
    mc = S.max_cos_with_left_basis(x0, g0, y, tol0)
    row["intruders"] = int(np.sum(mc < opts.eps))
    row["intruder_max_cos"] = [round(float(c), 6) for c in mc]
    u0 = S.top_left_vectors(x0, g0, k)
    v0 = S.top_right_vectors(x0, g0, k)
    dnorm = math.sqrt(fro2_d)
    if u0.shape[1] and v0.shape[1]:
        dv = S.matmul64(x, v0) - S.matmul64(x0, v0)  # delta @ v0
        proj = u0.T @ dv
        dtu = S.matmul64(x, u0, transpose_a=True) - S.matmul64(x0, u0, transpose_a=True)  # delta^T @ u0
        row["change_topk_cos"] = float(np.linalg.norm(proj)) / dnorm
        row["change_topk_cos_random"] = u0.shape[1] / math.sqrt(m * n)
        row["change_topk_left"] = float(np.linalg.norm(dtu)) / dnorm
        row["change_topk_left_random"] = math.sqrt(u0.shape[1] / m)
    return row
