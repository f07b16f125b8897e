"""Model Stock (Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024).

Per layer: the fine-tuned models' average is pulled back toward the pretrained weights by a ratio that
depends only on the angle between their task vectors: t = N cos(theta) / (1 + (N - 1) cos(theta)),
merged = t * mean(w_i) + (1 - t) * w_0. With more than two models, cos(theta) is the mean of the pairwise
cosines (the paper gives no rule for N > 2; this is mergekit's choice). filter_wise computes one angle per
row (output filter) instead of one per tensor.
"""
from __future__ import annotations

import torch
from pydantic import Field

from ..registry import MethodConfig, Regime, register


class ModelStockConfig(MethodConfig):
    filter_wise: bool = Field(False, description="one angle (and ratio t) per row instead of per tensor")


def model_stock_tensor(w0: torch.Tensor, ws: list[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    shape = w0.shape
    if filter_wise:
        flat0 = w0.reshape(1, -1) if w0.dim() <= 1 else w0.reshape(w0.shape[0], -1)
    else:
        flat0 = w0.reshape(-1)
    flat = [w.reshape(flat0.shape) for w in ws]
    offsets = [w - flat0 for w in flat]
    norms = [o.norm(dim=-1) for o in offsets]
    cos = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            c = (offsets[i] * offsets[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)
            cos.append(c.clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    n = len(ws)
    t = n * c / (1 + (n - 1) * c)
    avg = sum(flat) / n
    return (t * avg + (1 - t) * flat0).reshape(shape)


@register("merge", "model-stock", kind="merge", config=ModelStockConfig, regime=Regime.STREAMING,
          aliases=("model_stock",), requires_base=True, min_models=2,
          paper="Model Stock: All we need is just a few fine-tuned models (Jang et al., 2024)",
          summary="average of 2+ fine-tunes moved toward the base by a ratio set by the angle between their "
                  "task vectors")
def model_stock(tensors, base, ctx):
    return model_stock_tensor(base, tensors, ctx.cfg.filter_wise)
