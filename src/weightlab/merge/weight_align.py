"""Weight Aligning for class-incremental learning (Zhao et al., "Maintaining Discrimination and
Fairness in Class Incremental Learning", CVPR 2020).

After training a task that adds new classes, rescale the new classes' rows of the classifier
weight so their mean norm equals the old classes': gamma = mean ||w_old|| / mean ||w_new||.
The bias is untouched. The paper also clips the classifier weights to be non-negative after
each step (PyCIL omits it): offered as `clip_nonnegative`.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import Field

from ..engine.source import MappedSource
from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register


def weight_align(weight: torch.Tensor, old_classes: int, clip_nonnegative: bool = False) -> tuple[torch.Tensor, float]:
    if weight.dim() != 2:
        raise ConfigError(f"weight aligning needs a 2-D classifier weight, got shape {list(weight.shape)}")
    if not 0 < old_classes < weight.shape[0]:
        raise ConfigError(f"old_classes must be between 1 and {weight.shape[0] - 1}, got {old_classes}")
    w = weight.double()
    norms = w.norm(dim=1)
    gamma = float(norms[:old_classes].mean() / norms[old_classes:].mean())
    out = w.clone()
    out[old_classes:] *= gamma
    if clip_nonnegative:
        out.clamp_(min=0)
    return out.to(weight.dtype), gamma


class WeightAlignConfig(MethodConfig):
    head: str = Field(..., description="name of the classifier weight tensor, e.g. fc.weight")
    old_classes: int = Field(..., gt=0, description="number of classes learned before the last task")
    clip_nonnegative: bool = False


@register("merge", "weight-align", kind="transform", config=WeightAlignConfig, regime=Regime.STREAMING,
          paper="Maintaining Discrimination and Fairness in Class Incremental Learning (Zhao et al., 2020)",
          summary="rescale new-class classifier rows to the old classes' mean norm")
def weight_align_step(source, cfg: WeightAlignConfig):
    if cfg.head not in source.names():
        raise ConfigError(f"tensor '{cfg.head}' is not in the model; pick the classifier weight")

    def fn(name, t):
        return weight_align(t, cfg.old_classes, cfg.clip_nonnegative)[0] if name == cfg.head else t

    return MappedSource(source, fn, lambda i: replace(i))
