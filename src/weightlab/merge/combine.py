"""Shared steps of the task-vector merges (task arithmetic, TIES, DARE): pure tensor math."""
from __future__ import annotations

from typing import Literal

import torch

ZeroSign = Literal["majority", "positive"]


def elect_sign(stacked: torch.Tensor, zero_sign: ZeroSign = "majority") -> torch.Tensor:
    """TIES step 2: gamma = sign(sum_i tau_i) per coordinate.

    Where the sum is exactly 0: "majority" (the paper's reference) takes the sign of the sum
    of the elected signs over the tensor; "positive" takes +1 (mergekit's rule).
    """
    total = stacked.sum(0)
    if zero_sign == "positive":
        return torch.where(total >= 0, 1.0, -1.0).to(stacked.dtype)
    gamma = torch.sign(total)
    majority = torch.sign(gamma.sum())
    one = torch.ones((), dtype=gamma.dtype, device=gamma.device)
    return torch.where(gamma == 0, majority if majority != 0 else one, gamma)


def disjoint_merge(deltas: list[torch.Tensor], weights: list[float], zero_sign: ZeroSign = "majority",
                   normalize: bool = True) -> torch.Tensor:
    """TIES step 3: combine only entries whose sign agrees with the elected sign.

    With weights w_i: sum_i w_i tau_i [agree] / sum_i w_i [agree] (the disjoint mean when
    normalize, the disjoint sum otherwise). Zero entries never agree, so a coordinate where
    every trimmed entry is zero merges to 0.
    """
    w = torch.tensor(weights, dtype=deltas[0].dtype, device=deltas[0].device).view(-1, *([1] * deltas[0].dim()))
    stacked = torch.stack(deltas) * w
    gamma = elect_sign(stacked, zero_sign)
    agree = torch.sign(stacked) == gamma
    num = (stacked * agree).sum(0)
    if not normalize:
        return num
    den = (w * agree).sum(0)
    den = torch.where(den == 0, torch.ones_like(den), den)
    return num / den


def weighted_sum(deltas: list[torch.Tensor], weights: list[float], normalize: bool = False) -> torch.Tensor:
    out = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        out.add_(d, alpha=w)
    if normalize:
        s = sum(weights)
        if abs(s) >= 1e-8:
            out /= s
    return out


def rescale_to_norm(before: torch.Tensor, after: torch.Tensor, norm: str = "l1", eps: float = 1e-7) -> torch.Tensor:
    """Scale a sparsified task vector back to the original's l1 (or l2, linf) norm (mergekit's `rescale`).

    Left as it is when either norm is below eps (nothing meaningful to restore).
    """
    if norm == "l1":
        b, a = before.abs().sum(), after.abs().sum()
    elif norm == "l2":
        b, a = before.norm(), after.norm()
    elif norm == "linf":
        b, a = before.abs().max(), after.abs().max()
    else:
        raise ValueError(f"unknown norm {norm!r}")
    if b < eps or a < eps:
        return after
    return after * (b / a)


def combine_deltas(deltas: list[torch.Tensor], weights: list[float], consensus: bool, normalize: bool,
                   zero_sign: ZeroSign = "positive", chunk: int = 1 << 20) -> torch.Tensor:
    """The task-vector merges' last step: TIES' sign consensus (disjoint mean/sum) or a plain weighted sum.

    The consensus runs ``chunk`` entries at a time where every entry's result is its own business
    (zero_sign "positive"; "majority" looks at the whole tensor), so its stacked temporaries stay small.
    """
    if not consensus:
        return weighted_sum(deltas, weights, normalize)
    n = deltas[0].numel()
    if zero_sign != "positive" or n <= chunk:
        return disjoint_merge(deltas, weights, zero_sign, normalize)
    flat = [d.reshape(-1) for d in deltas]
    out = torch.empty_like(flat[0])
    for s in range(0, n, chunk):
        out[s:s + chunk] = disjoint_merge([f[s:s + chunk] for f in flat], weights, zero_sign, normalize)
    return out.view(deltas[0].shape)


def nonzero_weight_sum(cfg, weights: list[float], densities=None) -> None:
    """A normalized weighted sum divides by the weights' sum: refuse a zero sum before merging anything."""
    from ..errors import ConfigError

    if getattr(cfg, "normalize", False) and abs(sum(weights)) < 1e-12:
        raise ConfigError(f"the model weights {weights} sum to zero, and normalize divides by that sum; change "
                          "the weights or set normalize: false")
