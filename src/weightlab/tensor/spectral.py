"""Spectral math on weight matrices: Gram eigenvalues, WeightWatcher-style power-law fits, ranks, intruders.

Everything here is plain numpy on arrays (no files, no modules). Conventions follow
WeightWatcher 0.7.7 (`weightwatcher/WW_powerlaw.py`, `weightwatcher.py`) where a metric has a
WeightWatcher counterpart, so that numbers can be compared:

- The empirical spectral density (ESD) of W (N x M, N >= M) is the M eigenvalues of W^T W
  (squared singular values, no 1/N normalisation). We get them from the smaller Gram
  matrix, formed and diagonalised in float64: the same numbers as an SVD to ~1e-15 relative
  for the large eigenvalues, at a fraction of the cost.
- The power-law fit uses the eigenvalues above 1e-5, tries every one of them (except the
  largest) as xmin, takes the continuous MLE alpha = 1 + n / sum(ln(x / xmin)) and the KS
  distance D = max |1 - (x / xmin)^(1 - alpha) - (0, 1, ..., n-1) / n| over the tail, and
  keeps the xmin with the smallest D (the first one on ties). Below 20 eigenvalues it uses
  WeightWatcher's small-N variant (bias-corrected alpha, tails of at least 8). The scan is
  vectorised, and for large spectra pruned with exact lower bounds; it returns the same xmin
  as WeightWatcher's loop over every candidate.
- Numerical rank and effective rank count singular values above the resolution of this route
  (about s_max * sqrt(max(m, n) * eps64)) and above the rounding noise of the storage dtype.

Devices: the O(m n^2) steps (Gram matrices, their eigendecompositions) take ``device=``; on an
accelerator they run there in float64 (``torch.linalg.eigvalsh``/``eigh`` support float64 on
CUDA; MPS has none, see ``engine.placement.float64_device``), the input streamed over in blocks
of its stored dtype, and only the eigenvalues/vectors come back. The CPU path (``device=None`` or
cpu) is the numpy reference. The O(m n k) projections and the power-law fits stay on the CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .powerlaw import EVALS_THRESH, PowerLawFit, fit_power_law, log_alpha_norm  # noqa: F401  (re-exported)
from .ranks import EPS64, mp_bulk, rank_metrics, rank_tolerance, rounding_noise  # noqa: F401  (re-exported)

ALPHA_LOW, ALPHA_HIGH = 2.0, 6.0  # WeightWatcher's over-/under-trained thresholds
_CHUNK = 1 << 21  # elements per block (16 MiB of float64)


# ----------------------------------------------------------------------------- arrays

def to_numpy(t) -> np.ndarray:
    """A torch tensor (any float dtype) or array as a numpy array; bf16/fp8 become float32. No copy for fp32/fp64."""
    if isinstance(t, np.ndarray):
        return t
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype in (torch.float32, torch.float64, torch.float16):
        return t.numpy()
    return t.float().numpy()


def dtype_eps(dtype) -> float:
    """Machine epsilon of a storage dtype (torch or numpy); float32's for anything unknown."""
    name = str(dtype).replace("torch.", "")
    table = {"float64": 2.220446049250313e-16, "float32": 1.1920928955078125e-07, "float16": 9.765625e-04,
             "bfloat16": 7.8125e-03, "float8_e4m3fn": 0.125, "float8_e5m2": 0.25}
    return table.get(name, 1.1920928955078125e-07)


def _rows_per_chunk(cols: int) -> int:
    return max(1, _CHUNK // max(1, cols))


def _accel(device) -> torch.device | None:
    """The accelerator to compute on, or None for the numpy reference path."""
    if device is None:
        return None
    dev = torch.device(device)
    return None if dev.type == "cpu" else dev


def _block_to(a: np.ndarray, dev: torch.device) -> torch.Tensor:
    """One block of a (possibly read-only, memory-mapped) array as float64 on ``dev``.

    The block travels in its stored dtype (half the bytes of float64 for fp32) and is widened
    on the device; read-only blocks are copied first because torch cannot wrap them.
    """
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a).to(dev, non_blocking=False).to(torch.float64)


def gram_on(x: np.ndarray, dev: torch.device, x0: np.ndarray | None = None) -> torch.Tensor:
    """float64 Gram matrix of the smaller side of x (or of x - x0) accumulated on ``dev``, blockwise like ``gram``."""
    m, n = x.shape
    side = n if m >= n else m
    g = torch.zeros((side, side), dtype=torch.float64, device=dev)
    if m >= n:
        step = _rows_per_chunk(n)
        for r in range(0, m, step):
            a = _block_to(x[r:r + step], dev)
            if x0 is not None:
                a -= _block_to(x0[r:r + step], dev)
            g += a.T @ a
        return g
    step = _rows_per_chunk(m)
    for c in range(0, n, step):
        a = _block_to(x[:, c:c + step], dev)
        if x0 is not None:
            a -= _block_to(x0[:, c:c + step], dev)
        g += a @ a.T
    return g


def gram(x: np.ndarray) -> np.ndarray:
    """float64 Gram matrix of the smaller side: x^T x if rows >= cols else x x^T.

    Accumulated over blocks cast to float64 one at a time, so a 49152 x 576 embedding needs
    a 16 MiB block, not a 226 MiB float64 copy. numpy turns ``a.T @ a`` into one BLAS syrk.
    """
    m, n = x.shape
    if m >= n:
        step = _rows_per_chunk(n)
        if step >= m:
            a = np.asarray(x, dtype=np.float64)
            return a.T @ a
        g = np.zeros((n, n))
        for r in range(0, m, step):
            a = np.asarray(x[r:r + step], dtype=np.float64)
            g += a.T @ a
        return g
    step = _rows_per_chunk(m)
    if step >= n:
        a = np.asarray(x, dtype=np.float64)
        return a @ a.T
    g = np.zeros((m, m))
    for c in range(0, n, step):
        a = np.ascontiguousarray(x[:, c:c + step], dtype=np.float64)
        g += a @ a.T
    return g


def gram_of_difference(x: np.ndarray, x0: np.ndarray, device=None) -> np.ndarray:
    """float64 Gram matrix (smaller side) of x - x0, the difference formed exactly in float64, blockwise."""
    dev = _accel(device)
    if dev is not None:
        return gram_on(x, dev, x0).cpu().numpy()
    m, n = x.shape
    if m >= n:
        step = _rows_per_chunk(n)
        g = np.zeros((n, n))
        for r in range(0, m, step):
            a = np.asarray(x[r:r + step], dtype=np.float64) - np.asarray(x0[r:r + step], dtype=np.float64)
            g += a.T @ a
        return g
    step = _rows_per_chunk(m)
    g = np.zeros((m, m))
    for c in range(0, n, step):
        a = (np.ascontiguousarray(x[:, c:c + step], dtype=np.float64)
             - np.ascontiguousarray(x0[:, c:c + step], dtype=np.float64))
        g += a @ a.T
    return g


def matmul64(a: np.ndarray, b: np.ndarray, transpose_a: bool = False) -> np.ndarray:
    """a @ b (or a^T @ b) in float64 with ``a`` (possibly float32, large) cast blockwise over its rows."""
    m = a.shape[0]
    step = _rows_per_chunk(a.shape[1])
    if not transpose_a:
        out = np.empty((m, b.shape[1]))
        for r in range(0, m, step):
            out[r:r + step] = np.asarray(a[r:r + step], dtype=np.float64) @ b
        return out
    out = np.zeros((a.shape[1], b.shape[1]))
    for r in range(0, m, step):
        out += np.asarray(a[r:r + step], dtype=np.float64).T @ b[r:r + step]
    return out


def eigvalsh(g, device=None) -> np.ndarray:
    """Ascending eigenvalues of a symmetric matrix (or a stack), negatives from rounding clipped to 0.

    ``g`` may be a numpy array or a float64 tensor (on any device); with an accelerator ``device``
    the decomposition runs there in float64.
    """
    dev = _accel(device)
    if isinstance(g, torch.Tensor) or dev is not None:
        t = g if isinstance(g, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(g))
        if dev is not None:
            t = t.to(dev)
        ev = torch.linalg.eigvalsh(t.to(torch.float64)).cpu().numpy()
    else:
        ev = np.linalg.eigvalsh(g)
    return np.maximum(ev, 0.0, out=ev)


def matrix_eigenvalues(x: np.ndarray, device=None) -> tuple[np.ndarray, float]:
    """Squared singular values of x (ascending, float64) and ||x||_F^2 (the Gram trace)."""
    dev = _accel(device)
    if dev is not None:
        g = gram_on(x, dev)
        return eigvalsh(g), float(torch.trace(g))
    g = gram(x)
    tr = float(np.trace(g))
    return eigvalsh(g), tr


def conv_slice_eigenvalues(w: np.ndarray, device=None) -> tuple[np.ndarray, int, int]:
    """WeightWatcher's pooled conv ESD: eigenvalues of every k_h x k_w slice W[:, :, i, j] (c_out x c_in).

    Returns (sorted eigenvalues of all slices together, N, M) with N >= M the slice dimensions.
    """
    co, ci, kh, kw = w.shape
    dev = _accel(device)
    if dev is not None:  # one batched float64 Gram + eigvalsh over all slices on the device
        s = _block_to(np.transpose(w, (2, 3, 0, 1)), dev).reshape(kh * kw, co, ci)
        g = s.transpose(1, 2) @ s if co >= ci else s @ s.transpose(1, 2)
        ev = eigvalsh(g).reshape(-1)
        ev.sort()
        return ev, max(co, ci), min(co, ci)
    s = np.ascontiguousarray(np.transpose(w, (2, 3, 0, 1)), dtype=np.float64).reshape(kh * kw, co, ci)
    g = np.matmul(np.transpose(s, (0, 2, 1)), s) if co >= ci else np.matmul(s, np.transpose(s, (0, 2, 1)))
    ev = eigvalsh(g).reshape(-1)
    ev.sort()
    return ev, max(co, ci), min(co, ci)


def effective_rank(x) -> float:
    """Effective rank of a matrix (exp of the entropy of its normalised singular values)."""
    a = to_numpy(x)
    return rank_metrics(matrix_eigenvalues(a)[0], a.shape, dtype_eps(a.dtype))["effective_rank"]


# ----------------------------------------------------------------------------- SVD through the Gram matrix

@dataclass
class GramSVD:
    """Singular values (descending) and the singular vectors one side of the Gram matrix gives directly.

    ``left`` is True when ``vecs`` are left singular vectors (m <= n: eigenvectors of x x^T),
    else they are right singular vectors (eigenvectors of x^T x).
    """

    s: np.ndarray
    vecs: np.ndarray
    left: bool
    fro2: float


def gram_svd(x: np.ndarray, device=None) -> GramSVD:
    m, n = x.shape
    dev = _accel(device)
    if dev is not None:
        gt = gram_on(x, dev)
        tr = float(torch.trace(gt))
        lam_t, vecs_t = torch.linalg.eigh(gt)
        lam, vecs = lam_t.cpu().numpy(), vecs_t.cpu().numpy()
        del gt, lam_t, vecs_t
    else:
        g = gram(x)
        tr = float(np.trace(g))
        lam, vecs = np.linalg.eigh(g)
    lam = np.maximum(lam[::-1], 0.0)
    return GramSVD(np.sqrt(lam), np.ascontiguousarray(vecs[:, ::-1]), m <= n, tr)


def top_left_vectors(x: np.ndarray, g: GramSVD, k: int) -> np.ndarray:
    """The top-k left singular vectors of x (m x k, float64)."""
    k = min(k, len(g.s))
    if g.left:
        return g.vecs[:, :k]
    s = g.s[:k]
    keep = s > 0
    u = matmul64(x, g.vecs[:, :k][:, keep]) / s[keep]
    return u


def top_right_vectors(x: np.ndarray, g: GramSVD, k: int) -> np.ndarray:
    """The top-k right singular vectors of x (n x k, float64)."""
    k = min(k, len(g.s))
    if not g.left:
        return g.vecs[:, :k]
    s = g.s[:k]
    keep = s > 0
    return matmul64(x, g.vecs[:, :k][:, keep], transpose_a=True) / s[keep]


def max_cos_with_left_basis(x0: np.ndarray, g0: GramSVD, y: np.ndarray, tol: float) -> np.ndarray:
    """For each column y_j (unit vectors in R^m): max_i |<y_j, u_i>| over all left singular vectors u_i of x0.

    "All" is the thin SVD's set, as in the intruder-dimension papers' code: m vectors when
    m <= n (a full basis of R^m), else the n vectors u_i = x0 v_i / s_i, of which those with
    s_i <= tol (numerically zero, their direction undefined) are left out. The m > n case
    never forms U: |U^T y| = |diag(1/s) V^T (x0^T y)|.
    """
    if g0.left:
        c = np.abs(g0.vecs.T @ y)
    else:
        keep = g0.s > tol
        c = np.abs((g0.vecs[:, keep].T @ matmul64(x0, y, transpose_a=True)) / g0.s[keep][:, None])
    return c.max(axis=0) if c.size else np.zeros(y.shape[1])


def intruder_dimensions(w_ft, w_base, k: int = 10, eps: float = 0.5) -> dict:
    """Intruder dimensions of a fine-tuned matrix against its base (Shuttleworth et al.; PEFT's rule).

    A left singular vector y_j among the top k of the fine-tuned matrix is an intruder when
    max_i |cos(y_j, x_i)| < eps over all left singular vectors x_i of the base.
    """
    x, x0 = to_numpy(w_ft), to_numpy(w_base)
    g, g0 = gram_svd(x), gram_svd(x0)
    y = top_left_vectors(x, g, k)
    tol = rank_tolerance(g0.s[0] if len(g0.s) else 0.0, g0.fro2, x0.shape, dtype_eps(x0.dtype))
    mc = max_cos_with_left_basis(x0, g0, y, tol)
    return {"count": int(np.sum(mc < eps)), "max_cos": mc.tolist()}


# ----------------------------------------------------------------------------- histograms for plots

def log_histogram(evals: np.ndarray, bins: int = 60) -> dict | None:
    """Density of the positive eigenvalues on log-spaced bins: {"edges", "density"} (for log-log plots)."""
    ev = np.asarray(evals, dtype=np.float64)
    ev = ev[ev > 0]
    if len(ev) < 2 or ev.min() == ev.max():
        return None
    edges = np.logspace(math.log10(ev.min()), math.log10(ev.max()), bins + 1)
    edges[0], edges[-1] = ev.min(), ev.max()
    counts, _ = np.histogram(ev, bins=edges)
    dens = counts / (len(ev) * np.diff(edges))
    return {"edges": edges.tolist(), "density": dens.tolist(), "n": int(len(ev))}
