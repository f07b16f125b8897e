"""Pruning masks from scores (True = keep). Lowest scores are pruned; ties go to the lowest index."""
from __future__ import annotations

import math

import torch


def count_fraction(count: int, numel: int) -> float:
    """The sparsity that makes the rules above prune exactly ``count`` of ``numel`` weights.

    They take floor(sparsity * numel); count / numel times numel can land just below count in floating
    point (15 / 22 * 22 = 14.999...), which would prune one weight fewer than an allocation asked for.
    """
    f = count / numel
    while int(f * numel) < count:
        f = math.nextafter(f, math.inf)
    return f


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): prune N of every M consecutive inputs of a row."""
    if pattern in (None, "", "unstructured"):
        return None
    try:
        n, m = (int(x) for x in str(pattern).split(":"))
    except ValueError:
        raise ValueError(f"pattern must look like 2:4 (N:M), got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {pattern}")
    return n, m


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, prune exactly floor(sparsity * cols) lowest scores (Wanda's comparison group).

    The k-th smallest value per row (a selection, not a sort) splits each row: everything below it is
    pruned, then entries equal to it in index order until k are gone. That is exactly the first k of a
    stable ascending sort (ties to the lowest index), at a fraction of the sort's time on wide rows.
    NaN scores (which a sort puts last) fall back to the sort.
    """
    k = int(sparsity * scores.shape[1])
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if torch.isnan(scores).any():
        mask = torch.ones_like(scores, dtype=torch.bool)
        mask.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], False)
        return mask
    kth = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    below = scores < kth
    tie = scores == kth
    need = k - below.sum(1, keepdim=True)
    return ~(below | (tie & (tie.cumsum(1) <= need)))


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune exactly floor(sparsity * numel) lowest scores of the whole matrix."""
    k = int(sparsity * scores.numel())
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.sort(scores.reshape(-1), stable=True).indices[:k]] = False
    return mask.view(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every row, prune the n lowest scores of each group of m consecutive columns."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input columns are not a multiple of M={m} for an N:M pattern")
    g = scores.reshape(rows, cols // m, m)
    idx = torch.sort(g, dim=2, stable=True).indices[:, :, :n]
    mask = torch.ones_like(g, dtype=torch.bool)
    mask.scatter_(2, idx, False)
    return mask.view(rows, cols)


def lamp_scores(w: torch.Tensor) -> torch.Tensor:
    """LAMP / DIMAP score: w^2 over the energy of all weights at least as large (1 for the largest)."""
    sq = w.detach().float().reshape(-1) ** 2
    order = torch.argsort(sq, descending=True, stable=True)
    cum = torch.cumsum(sq[order], 0)
    out = torch.empty_like(sq)
    out[order] = torch.where(cum > 0, sq[order] / cum, torch.zeros_like(cum))
    return out.view(w.shape)
