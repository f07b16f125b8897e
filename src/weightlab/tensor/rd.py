"""Rate-distortion layer-wise sparsity allocation by dynamic programming (Xu et al., ICCV 2023)."""
from __future__ import annotations

import itertools

import torch


def rd_allocate(curves: list[torch.Tensor], sizes: list[int], levels: torch.Tensor, sparsity: float,
                unit: int | None = None, min_levels: list[int] | None = None) -> list[int]:
    """Choose a pruning level per layer minimising the summed distortion under a kept-weight budget.

    curves[l][j] = distortion of pruning layer l alone by amount levels[j]; sizes[l] = weights
    in layer l. Budget: sum_l sizes[l] * (1 - levels[a_l]) <= (1 - sparsity) * sum sizes.
    Budgets are counted in units of `unit` weights (default: ~sum/20000) to bound the table;
    kept counts are rounded up, so the returned choice always meets the budget.
    Returns the chosen level index per layer.
    """
    total = sum(sizes)
    unit = unit or max(1, total // 20000)
    budget = int((1 - sparsity) * total) // unit
    L, J = len(curves), len(levels)
    cost = [[-((-kept_weights(n, a)) // unit) for a in levels] for n in sizes]  # ceil division
    lo = min_levels or [0] * L
    INF = float("inf")
    dp = torch.full((budget + 1,), INF, dtype=torch.float64)
    dp[0] = 0.0
    dp = torch.cummin(dp, 0).values  # dp[b] = best distortion using at most b units
    choice = []
    for l in range(L):
        new = torch.full_like(dp, INF)
        arg = torch.full((budget + 1,), -1, dtype=torch.long)
        for j in range(lo[l], J):
            c = cost[l][j]
            if c > budget:
                continue
            cand = torch.full_like(dp, INF)
            cand[c:] = dp[: budget + 1 - c] + float(curves[l][j])
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.full_like(arg, j), arg)
        dp = new
        choice.append(arg)
    b = int(torch.argmin(dp))
    if dp[b] == INF:
        raise ValueError("no allocation meets the sparsity target within the allowed levels")
    picks = []
    for l in reversed(range(L)):
        j = int(choice[l][b])
        picks.append(j)
        b -= cost[l][j]
    return picks[::-1]


def kept_weights(n: int, amount) -> int:
    """Weights a layer of n keeps when pruned by `amount` (whole weights)."""
    return int(round(n * (1 - float(amount))))


def brute_force(curves, sizes, levels, sparsity):
    """Exhaustive search (tests): the minimum-distortion choice meeting the budget."""
    budget = int((1 - sparsity) * sum(sizes))
    best, arg = float("inf"), None
    for combo in itertools.product(range(len(levels)), repeat=len(curves)):
        kept = sum(kept_weights(n, levels[j]) for n, j in zip(sizes, combo))
        if kept <= budget:
            d = sum(float(curves[l][j]) for l, j in enumerate(combo))
            if d < best:
                best, arg = d, list(combo)
    return arg
