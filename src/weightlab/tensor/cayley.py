"""Orthogonal blocks from free parameters: skew-symmetric matrices, the Cayley transform, block-diagonal
rotations and butterfly permutations (the math of OFT and BOFT; PEFT's conventions).

Shapes: a batch of ``n`` blocks of size ``b``. A skew matrix is stored either whole (BOFT: S = (A - A^T)/2 of a
free (n, b, b) tensor) or as its strict upper triangle (OFT: (n, b(b-1)/2), row-major as ``triu_indices``).
A block-diagonal rotation acts on the last dimension of x split as (n, b): ``x @ blockdiag(R_0 .. R_{n-1})``.
"""
from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=64)
def _triu(b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Strict upper-triangle indices of a b x b block, made once per (b, device): every forward needs them."""
    rows, cols = torch.triu_indices(b, b, 1, device=device)
    return rows, cols


def skew_from_upper(upper: torch.Tensor, b: int) -> torch.Tensor:
    """(n, b(b-1)/2) strict upper triangles -> (n, b, b) skew-symmetric S = U - U^T."""
    rows, cols = _triu(b, upper.device)
    S = upper.new_zeros(upper.shape[0], b, b)
    S[:, rows, cols] = upper
    return S - S.transpose(-2, -1)


def upper_of(S: torch.Tensor) -> torch.Tensor:
    """(n, b, b) -> its strict upper triangles (n, b(b-1)/2), the inverse of :func:`skew_from_upper`."""
    rows, cols = _triu(S.shape[-1], S.device)
    return S[:, rows, cols]


def block_size_of(n_upper: int) -> int:
    """b from the length b(b-1)/2 of a stored upper triangle; ValueError if no b fits."""
    b = int(round((1 + math.sqrt(1 + 8 * n_upper)) / 2))
    if b * (b - 1) // 2 != n_upper:
        raise ValueError(f"{n_upper} is not b(b-1)/2 for any block size b")
    return b


def neumann_powers(terms: int) -> list[tuple[int, float]]:
    """(power, coefficient) of PEFT's (>= 0.18) Cayley-Neumann series: I + 2S + 2S^2 + ... + 2S^(k-1) + S^k,
    the series of (I + S)(I - S)^-1 cut after S^k; k = terms - 1 (k = 3 for both 3 and 4 terms, as PEFT)."""
    if terms <= 1:
        return [(0, 1.0)]
    if terms == 2:
        return [(0, 1.0), (1, 2.0)]
    top = 2 + max(0, terms - 4) + 1
    return [(0, 1.0)] + [(p, 2.0) for p in range(1, top)] + [(top, 1.0)]


def cayley(S: torch.Tensor, neumann_terms: int | None = None) -> torch.Tensor:
    """Orthogonal blocks from skew-symmetric ones (n, b, b).

    Exact (``neumann_terms=None``): R = (I - S)(I + S)^-1, orthogonal for any skew S (I + S is never singular).
    Neumann: PEFT's truncated series, which approximates (I + S)(I - S)^-1 = the exact form of -S, so the two
    options of PEFT's OFT turn in opposite directions for the same parameters (reproduced, not corrected);
    only approximately orthogonal, error O(||S||^terms)."""
    n, b, _ = S.shape
    eye = torch.eye(b, device=S.device, dtype=S.dtype)
    if neumann_terms is None:
        I = eye.expand(n, b, b)  # noqa: E741
        return torch.linalg.solve(I + S, I - S, left=False)
    R = eye.repeat(n, 1, 1)
    power, P = 0, None
    for p, coef in neumann_powers(neumann_terms):
        if p == 0:
            continue
        while power < p:  # S^p by repeated products, in PEFT's order
            P = S if P is None else torch.bmm(P, S)
            power += 1
        R = torch.add(R, P, alpha=coef)  # fused, as PEFT's add_(alpha=2): no separate product
    return R


def coft_project(upper: torch.Tensor, b: int, eps: float) -> torch.Tensor:
    """COFT's constraint on stored upper triangles (PEFT's ``_project_batch``): each block's skew matrix is
    scaled down to Frobenius norm eps / sqrt(n) when it is larger (n = number of stored blocks)."""
    S = skew_from_upper(upper, b)
    bound = eps / torch.sqrt(torch.tensor(float(upper.shape[0])))  # float32, as PEFT
    norm = torch.linalg.matrix_norm(S, keepdim=True)
    keep = norm <= bound
    return upper_of(torch.where(keep, S, bound * (S / torch.where(keep, torch.ones_like(norm), norm))))


def block_rotate(x: torch.Tensor, R: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x (..., n*b) times blockdiag(R) (R: (n, b, b), or (1, b, b) shared by every block) on the right;
    ``transpose``: times blockdiag(R)^T."""
    n, b = R.shape[0], R.shape[-1]
    xs = x.reshape(*x.shape[:-1], x.shape[-1] // b, b)
    if n == 1 and xs.shape[-2] != 1:
        R = R.expand(xs.shape[-2], b, b)
    out = torch.einsum("...rk,rck->...rc" if transpose else "...rk,rkc->...rc", xs, R)
    return out.reshape(x.shape)


def block_diag(R: torch.Tensor, blocks: int | None = None) -> torch.Tensor:
    """The dense (n*b, n*b) block-diagonal matrix of R (n, b, b); a single shared block repeated ``blocks`` times."""
    mats = list(R) if blocks is None or R.shape[0] != 1 else [R[0]] * blocks
    return torch.block_diag(*mats)


def butterfly_perm(n: int, block_num: int, block_size: int, level: int) -> torch.Tensor:
    """The index permutation of butterfly factor ``level`` (0 = the plain block-diagonal factor): within each
    chunk of n * 2^level / block_num entries, its half-blocks (block_size / 2 entries) in the order even ones,
    then odd ones (PEFT's ``block_butterfly_perm``). perm[i] = the source index of entry i."""
    idx = torch.arange(n)
    if level == 0:
        return idx
    chunk, half = n * 2 ** level // block_num, block_size // 2
    halves = chunk // half
    order = torch.cat([torch.arange(0, halves, 2), torch.arange(1, halves, 2)])
    within = (order[:, None] * half + torch.arange(half)[None, :]).reshape(-1)
    return (torch.arange(0, n, chunk)[:, None] + within[None, :]).reshape(-1)


def butterfly_apply(x: torch.Tensor, R: torch.Tensor, perms: list[torch.Tensor],
                    transpose: bool = False) -> torch.Tensor:
    """x (..., d) times M = M_{L-1} ... M_1 M_0 with M_l = P_l blockdiag(R[l]) P_l^T (P_l[i, perm_l[i]] = 1);
    ``transpose``: times M^T. R: (L, block_num, b, b) orthogonal blocks, perms: L permutations of d."""
    levels = range(len(perms)) if transpose else reversed(range(len(perms)))
    for lvl in levels:  # x M_l = (x[..., inv] @ blockdiag(R_l))[..., perm]
        p = perms[lvl]
        inv = torch.argsort(p)
        x = block_rotate(x[..., inv], R[lvl], transpose)[..., p]
    return x
