"""Activate-while-pruning (AP) on top of iterative magnitude pruning, and the dead-neuron rate.

Liu et al., "AP: Selective Activation for De-sparsifying Pruned Neural Networks" (2023):
each round prunes (p - a)% by global magnitude, then a% more among the NEGATIVE surviving
weights that moved least during the round (|w_end - w_start|), which lowers the dynamic
dead-neuron rate (DNR: share of ReLU outputs that are 0).
"""
from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field
from torch import nn

from ..registry import MethodConfig, Regime, register


class APConfig(MethodConfig):
    rate: float = Field(0.2, gt=0, lt=1, description="share of the remaining weights pruned per round (IMP)")
    ap_rate: float = Field(0.02, ge=0, lt=1, description="share pruned by the AP step among negative weights")


@torch.no_grad()
def dead_neuron_rate(model: nn.Module, x: torch.Tensor) -> float:
    """Share of ReLU outputs that are exactly 0 on inputs x."""
    zeros, total = [0], [0]

    def hook(mod, inp, out):
        zeros[0] += int((out == 0).sum())
        total[0] += out.numel()

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        model(x)
    finally:
        for h in hs:
            h.remove()
    return zeros[0] / total[0] if total[0] else 0.0


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() >= 2}


def global_magnitude_masks(model: nn.Module, masks: dict[str, torch.Tensor], amount: float) -> dict:
    """Remove `amount` (share of all weights) more, by global |w| among the surviving ones."""
    ws = _weights(model)
    alive = torch.cat([ws[n].detach().abs()[masks[n]] for n in ws])
    k = int(amount * sum(m.numel() for m in masks.values()))
    if k <= 0 or alive.numel() == 0:
        return masks
    thr = torch.kthvalue(alive, min(k, alive.numel())).values
    return {n: masks[n] & (ws[n].detach().abs() > thr) for n in ws}


def ap_step(model: nn.Module, start: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
            amount: float) -> dict[str, torch.Tensor]:
    """Prune int(amount * total) more among surviving NEGATIVE weights with the smallest movement."""
    ws = _weights(model)
    total = sum(m.numel() for m in masks.values())
    num = int(amount * total)
    cand = []
    for n, w in ws.items():
        sel = masks[n] & (w.detach() < 0)
        idx = sel.reshape(-1).nonzero().squeeze(1)
        move = (w.detach() - start[n]).abs().reshape(-1)[idx]
        cand += [(float(mv), n, int(i)) for mv, i in zip(move, idx)]
    cand.sort()
    out = {n: m.clone() for n, m in masks.items()}
    for _, n, i in cand[:num]:
        out[n].view(-1)[i] = False
    return out


@register("compress", "ap", kind="whole", config=APConfig, regime=Regime.WHOLE_MODEL,
          paper="AP: Selective Activation for De-sparsifying Pruned Neural Networks (Liu et al., 2023)",
          summary="iterative magnitude pruning whose rounds also remove slow-moving negative weights (lower DNR)")
def iterative_prune(model: nn.Module, train: Callable[[nn.Module, dict], None], rounds: int, rate: float = 0.2,
                    ap_rate: float = 0.02, rewind: dict | None = None) -> dict[str, torch.Tensor]:
    """IMP (+AP when ap_rate > 0): each round trains, prunes `rate` of the remaining weights, rewinds.

    ``train(model, masks)`` must train with the masks kept (e.g. MaskKeeper). Returns the masks.
    """
    ws = _weights(model)
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in ws.items()}
    init = {n: w.detach().clone() for n, w in model.state_dict().items()}
    rewind = rewind or init
    for _ in range(rounds):
        start = {n: w.detach().clone() for n, w in ws.items()}
        train(model, masks)
        alive = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        masks = global_magnitude_masks(model, masks, alive * rate - ap_rate)
        if ap_rate > 0:
            masks = ap_step(model, start, masks, ap_rate)
        model.load_state_dict(rewind)
        with torch.no_grad():
            for n, w in ws.items():
                w.mul_(masks[n].to(w.dtype))
    return masks
