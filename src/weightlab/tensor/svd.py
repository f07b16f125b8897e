"""Truncated SVDs: exact (full SVD, keep r) and fast randomized (Halko, Martinsson, Tropp 2011)."""
from __future__ import annotations

import torch


def truncated_svd(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, Vh_r) of W in float32 (float64 inputs stay float64) with W ~ U_r diag(S_r) Vh_r."""
    X = W if W.dtype == torch.float64 else W.float()
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return U[:, :r], S[:r], Vh[:r]


def randomized_svd(W: torch.Tensor, r: int, niter: int = 4, oversample: int = 10,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r randomized SVD with ``niter`` subspace (power) iterations, re-orthonormalized by QR.

    Costs O(out*in*(r+p)*(2*niter+2)) instead of a full SVD's O(out*in*min(out,in)); with the
    reference scripts' niter=16 the top-r factors match the exact SVD closely on LLM weights.
    """
    X = W if W.dtype == torch.float64 else W.float()
    m, n = X.shape
    k = min(r + oversample, m, n)
    g = torch.Generator(device="cpu").manual_seed(seed)
    Om = torch.randn(n, k, generator=g, dtype=X.dtype).to(X.device)
    Q, _ = torch.linalg.qr(X @ Om)
    for _ in range(niter):
        Z, _ = torch.linalg.qr(X.t() @ Q)
        Q, _ = torch.linalg.qr(X @ Z)
    Bm = Q.t() @ X
    Ub, S, Vh = torch.linalg.svd(Bm, full_matrices=False)
    U = Q @ Ub
    return U[:, :r], S[:r], Vh[:r]


def lowrank_factor(D: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A the best rank-r approximation of D (sqrt of the singular values on each side)."""
    U, S, Vh = truncated_svd(D, min(r, *D.shape))
    sq = S.sqrt()
    return U * sq, sq[:, None] * Vh
