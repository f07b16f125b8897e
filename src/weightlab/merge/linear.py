"""Linear merge / uniform model soup (Wortsman et al., "Model soups", ICML 2022)."""
from __future__ import annotations

from pydantic import Field

import torch

from ..registry import MethodConfig, Regime, register
from .chunked import weighted_sum_into
from .combine import nonzero_weight_sum


class LinearConfig(MethodConfig):
    normalize: bool = Field(True, description="divide by the sum of the weights (a weighted average)")


@register("merge", "linear", kind="merge", config=LinearConfig, regime=Regime.STREAMING, aliases=("soup", "uniform-soup"),
          paper="Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing "
                "inference time (Wortsman et al., 2022)",
          summary="weighted average of the models (uniform soup with equal weights)", min_models=1,
          raw_inputs=True, check=nonzero_weight_sum)
def linear(tensors, base, ctx):
    out = torch.empty(tensors[0].shape, dtype=ctx.output_dtype(tensors))
    return weighted_sum_into(out, tensors, ctx.weights, ctx.compute_dtype(tensors), normalize=ctx.cfg.normalize)
