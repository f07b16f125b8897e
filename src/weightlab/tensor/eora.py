"""Low-rank compensation of a compression error: EoRA (eigenspace) and plain SVD.

EoRA (Liu et al., "EoRA: Training-free Compensation for Compressed LLM with Eigenspace
Low-Rank Approximation", NVlabs 2024): with C = X^T X = Q L Q^T (negative / zero eigenvalues
replaced by the smallest positive one), Q' = Q L^(1/2), SVD  dW Q' = U S V^T  and
B = U_r S_r^(1/2), A = S_r^(1/2) V_r^T Q'^-1.  B A is the exact minimiser of
||(dW - B A) X^T||_F over rank-r matrices (Eckart-Young in the whitened space); the minimum
is sum_{i>r} s_i^2. The scale of C does not matter. Plain SVD compensation truncates dW itself
(optimal for white inputs only).
"""
from __future__ import annotations

import torch


def _split(Uu, S, Vh, r):
    sq = S[:r].sqrt()
    return Uu[:, :r] * sq, sq[:, None] * Vh[:r]


def svd_lowrank(dW: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A the best rank-r approximation of dW in Frobenius norm."""
    Uu, S, Vh = torch.linalg.svd(dW.double(), full_matrices=False)
    B, A = _split(Uu, S, Vh, rank)
    return B.float(), A.float()


def _whiten(C: torch.Tensor):
    C = C.double()
    C = (C + C.T) / 2
    lam, Q = torch.linalg.eigh(C)
    pos = lam[lam > 0]
    floor = pos.min() if pos.numel() else torch.tensor(1.0, dtype=lam.dtype, device=lam.device)
    lam = torch.where(lam > 0, lam, floor)
    return Q * lam.sqrt(), (Q / lam.sqrt()).T  # Q', Q'^-1


def eora(dW: torch.Tensor, C: torch.Tensor, rank: int, return_spectrum: bool = False):
    """(B, A) minimising ||(dW - B A) X^T||_F with C = X^T X (any positive multiple of it)."""
    Qp, Qpinv = _whiten(C)
    Uu, S, Vh = torch.linalg.svd(dW.double() @ Qp, full_matrices=False)
    B, A = _split(Uu, S, Vh, rank)
    A = A @ Qpinv
    if return_spectrum:
        return B.float(), A.float(), S
    return B.float(), A.float()


def weighted_error(E: torch.Tensor, C: torch.Tensor) -> float:
    """||E X^T||_F^2 = tr(E C E^T) for C = X^T X."""
    E = E.double()
    return float(torch.einsum("ij,jk,ik->", E, C.double(), E))
