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


def model_stock_tensor(w0: torch.Tensor, ws: list[torch.Tensor], filter_wise: bool = False,
                       chunk: int = 1 << 20) -> torch.Tensor:
    """w0 + t * mean(w_i - w0), t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the offsets.

    The offsets are formed ~``chunk`` entries at a time (by rows), so the memory beyond the inputs is the
    output and a few chunks, not N full-size offsets.
    """
    shape = w0.shape
    base = w0.reshape(1, -1) if w0.dim() <= 1 else w0.reshape(w0.shape[0], -1)
    flat = [w.reshape(base.shape) for w in ws]
    n, rows = len(ws), base.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    acc = torch.zeros_like(base)  # the sum of the offsets, then the output
    sq = torch.zeros(n, rows, dtype=base.dtype, device=base.device)
    dots = torch.zeros(len(pairs), rows, dtype=base.dtype, device=base.device)
    step = max(1, chunk // max(1, base.shape[1]))
    for r0 in range(0, rows, step):
        sl = slice(r0, r0 + step)
        offs = [w[sl] - base[sl] for w in flat]
        for k, o in enumerate(offs):
            sq[k, sl] = (o * o).sum(1)
            acc[sl] += o
        for p, (i, j) in enumerate(pairs):
            dots[p, sl] = (offs[i] * offs[j]).sum(1)
    if not filter_wise:  # one angle for the whole tensor
        sq, dots = sq.sum(1, keepdim=True), dots.sum(1, keepdim=True)
    norms = sq.sqrt()
    cos = torch.stack([(dots[p] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
                       for p, (i, j) in enumerate(pairs)]).mean(0)
    t = n * cos / (1 + (n - 1) * cos)
    return acc.mul_((t / n).unsqueeze(-1)).add_(base).reshape(shape)


@register("merge", "model-stock", kind="merge", config=ModelStockConfig, regime=Regime.STREAMING,
          aliases=("model_stock",), requires_base=True, min_models=2,
          paper="Model Stock: All we need is just a few fine-tuned models (Jang et al., 2024)",
          summary="average of 2+ fine-tunes moved toward the base by a ratio set by the angle between their "
                  "task vectors")
def model_stock(tensors, base, ctx):
    return model_stock_tensor(base, tensors, ctx.cfg.filter_wise)
