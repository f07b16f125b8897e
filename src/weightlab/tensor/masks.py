"""Masks for sparsifying task vectors: exact top-k, the TIES reference's kthvalue rule, random drops."""
from __future__ import annotations

import torch


def topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly int(density * numel) largest-|x| entries; ties at the threshold go to the lowest indices.

    Deterministic (unlike torch.topk's choice among equal values), so the streaming chunked
    TIES path, which fills ties in index order chunk by chunk, selects the same entries.
    """
    n = x.numel()
    k = int(density * n)
    if density >= 1 or k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    a = x.detach().abs().reshape(-1)
    if k == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    thr = torch.kthvalue(a, n - k + 1).values  # the k-th largest
    mask = a > thr
    need = k - int(mask.sum())
    if need > 0:  # the ties at the threshold with the lowest indices (nonzero lists them in index order)
        mask[torch.nonzero(a == thr).squeeze(1)[:need]] = True
    return mask.view(x.shape)


def kth_threshold_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """The TIES reference's trim: keep |x| >= the (n - int(density*n))-th smallest |x|.

    This keeps int(density*n) + 1 entries (plus ties), one more than the exact top-k.
    """
    n = x.numel()
    kth = n - int(density * n)
    if density >= 1 or kth <= 0:
        return torch.ones_like(x, dtype=torch.bool)
    a = x.detach().abs().reshape(-1).float()
    thr = torch.kthvalue(a, kth).values
    return (a >= thr).view(x.shape)


def random_keep_mask(x: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bernoulli(density) keep mask (DARE drops with probability p = 1 - density)."""
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    return torch.rand(x.shape, generator=generator, device=x.device) < density


def threshold_from_counts(counts: torch.Tensor, k: int) -> int:
    """Index of the bin holding the k-th largest element, given per-bin counts in ascending order."""
    from_top = torch.flip(counts, [0]).cumsum(0)
    pos = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)))
    return counts.numel() - 1 - pos


def abs_bits(x: torch.Tensor) -> torch.Tensor:
    """|x| as int32 bit patterns: for non-negative floats the integer order equals the float order."""
    return x.detach().float().abs().reshape(-1).view(torch.int32)


def kth_largest_abs(chunks_factory, k: int) -> float:
    """Exact k-th largest |x| over a stream of tensors, in two passes and O(65536) memory.

    ``chunks_factory()`` must return a fresh iterator over the tensors each time it is called
    (each pass re-reads them). Radix select on the float32 bit pattern: the first pass
    histograms the high 16 bits, the second the low 16 bits inside the chosen high bin.
    """
    if k <= 0:
        return float("inf")
    hi = torch.zeros(65536, dtype=torch.int64)
    total = 0
    for t in chunks_factory():
        b = abs_bits(t)
        total += b.numel()
        hi += torch.bincount(b >> 16, minlength=65536)
    if k > total:
        return 0.0
    hbin = threshold_from_counts(hi, k)
    above = int(hi[hbin + 1:].sum())
    lo = torch.zeros(65536, dtype=torch.int64)
    for t in chunks_factory():
        b = abs_bits(t)
        sel = b[(b >> 16) == hbin]
        lo += torch.bincount(sel & 0xFFFF, minlength=65536)
    lbin = threshold_from_counts(lo, k - above)
    bits = torch.tensor([(hbin << 16) | lbin], dtype=torch.int32)
    return float(bits.view(torch.float32))
