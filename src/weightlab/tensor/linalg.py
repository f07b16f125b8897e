"""Linear algebra helpers (fp32/fp64 math on plain tensors)."""
from __future__ import annotations

import torch


def polar_factor(a: torch.Tensor) -> torch.Tensor:
    """The orthonormal factor of the polar decomposition: A = P S Q^T -> P Q^T.

    The closest matrix with orthonormal columns to A (Procrustes); what TSV-M uses to
    decorrelate the concatenated task singular vectors.
    """
    p, _, qt = torch.linalg.svd(a, full_matrices=False)
    return p @ qt


def excess_kurtosis(x: torch.Tensor) -> float:
    x = x.detach().double().reshape(-1)
    if x.numel() < 4:
        return 0.0
    c = x - x.mean()
    var = (c * c).mean()
    if var <= 0:
        return 0.0
    return float((c ** 4).mean() / var ** 2 - 3.0)
