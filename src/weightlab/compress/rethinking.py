"""The train-from-scratch baseline of "Rethinking the Value of Network Pruning" (Liu et al., ICLR 2019):
keep the pruned architecture (here: the sparsity masks), re-initialize every weight at random
and train it like the original (Scratch-E) or for the same compute (Scratch-B)."""
from __future__ import annotations

import torch
from torch import nn

from ..registry import MethodConfig, Regime, register
from .masks import masks_from_zeros


@register("compress", "scratch", kind="whole", config=MethodConfig, regime=Regime.WHOLE_MODEL,
          paper="Rethinking the Value of Network Pruning (Liu et al., ICLR 2019)",
          summary="re-initialize the pruned architecture at random (train-from-scratch baseline)")
def reinitialize_pruned(model: nn.Module, masks: dict[str, torch.Tensor] | None = None, seed: int = 0) -> dict:
    """Re-initialize all parameters (each module's reset_parameters) and re-apply the masks; returns them."""
    masks = masks if masks is not None else masks_from_zeros(model)
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, mk in masks.items():
            params[n].mul_(mk.to(params[n].dtype))
    return masks
