"""Per-layer sparsity allocation: uniform, global magnitude, LAMP, rate-distortion DP (DIMAP: dimap.py)."""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from ..tensor.pruning import count_fraction, lamp_scores
from ..tensor.rd import rd_allocate

Weights = dict[str, torch.Tensor]  # layer name -> (out, in) weight


@register("compress", "uniform", kind="allocate", config=MethodConfig, regime=Regime.STREAMING,
          paper="(every layer at the target sparsity)", summary="the same sparsity in every layer")
def uniform(weights: Weights, sparsity: float, **_) -> dict[str, float]:
    return {n: sparsity for n in weights}


def _global_rank(weights: Weights, sparsity: float, score: Callable, groups: dict[str, str] | None = None):
    """Prune the globally lowest scores (within each group if given); returns per-layer sparsity."""
    by_group: dict[str, list[str]] = {}
    for n in weights:
        by_group.setdefault(groups[n] if groups else "all", []).append(n)
    out = {}
    for names in by_group.values():
        scores = {n: score(weights[n]).reshape(-1).float() for n in names}
        flat = torch.cat(list(scores.values()))
        k = int(sparsity * flat.numel())
        if k == 0:
            out.update({n: 0.0 for n in names})
            continue
        thr = torch.kthvalue(flat, k).values
        below = {n: int((s < thr).sum()) for n, s in scores.items()}
        ties = {n: int((s == thr).sum()) for n, s in scores.items()}
        need = k - sum(below.values())
        for n in names:  # ties at the threshold are shared out in layer order
            take = min(need, ties[n])
            need -= take
            out[n] = count_fraction(below[n] + take, scores[n].numel())
    return out


@register("compress", "global", kind="allocate", config=MethodConfig, regime=Regime.STREAMING,
          paper="global magnitude pruning (one |W| threshold over all layers)",
          summary="rank |W| across all layers; each layer gets the share below the global threshold")
def global_magnitude(weights: Weights, sparsity: float, **_) -> dict[str, float]:
    return _global_rank(weights, sparsity, lambda w: w.abs())


@register("compress", "lamp", kind="allocate", config=MethodConfig, regime=Regime.STREAMING,
          paper="Layer-adaptive Sparsity for the Magnitude-based Pruning (Lee et al., ICLR 2021)",
          summary="rank LAMP scores w^2 / (energy of larger weights) globally; no layer is emptied")
def lamp(weights: Weights, sparsity: float, **_) -> dict[str, float]:
    return _global_rank(weights, sparsity, lamp_scores)


@register("compress", "rd", kind="allocate", config=MethodConfig, regime=Regime.WHOLE_MODEL,
          paper="Efficient Joint Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks (Xu et al., "
                "ICCV 2023)",
          summary="distortion curve per layer, dynamic programming for the global target")
def rd(weights: Weights, sparsity: float, *, distortion: Callable[[str, float], float] | None = None,
       levels: int = 11, **_) -> dict[str, float]:
    """``distortion(layer, amount)`` measures the output distortion of pruning that layer alone."""
    if distortion is None:
        raise ConfigError("the rd allocation needs calibration data to measure distortion curves")
    amounts = torch.linspace(0, 1, levels)
    names = list(weights)
    curves = [torch.tensor([distortion(n, float(a)) for a in amounts]) for n in names]
    sizes = [weights[n].numel() for n in names]
    picks = rd_allocate(curves, sizes, amounts, sparsity)
    return {n: float(amounts[j]) for n, j in zip(names, picks)}
