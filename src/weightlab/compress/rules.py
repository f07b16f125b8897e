"""What a per-layer pruning rule receives, and the shared mask step."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..engine.calibration import LayerStats
from ..tensor.pruning import layer_mask, nm_mask, row_mask


@dataclass
class LayerContext:
    name: str
    module: nn.Module
    weight: torch.Tensor  # (out, in) float32
    sparsity: float
    nm: tuple[int, int] | None
    cfg: object
    stats: LayerStats | None = None
    extra: dict = field(default_factory=dict)  # e.g. gradient statistics keyed by layer name


def mask_from_scores(scores: torch.Tensor, ctx: LayerContext, group: str = "row") -> torch.Tensor:
    """True = keep. N:M overrides the comparison group."""
    if ctx.nm is not None:
        return nm_mask(scores, *ctx.nm)
    return row_mask(scores, ctx.sparsity) if group == "row" else layer_mask(scores, ctx.sparsity)
