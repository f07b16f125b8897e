"""Linear merge / uniform model soup (Wortsman et al., "Model soups", ICML 2022)."""
from __future__ import annotations

from pydantic import Field

from ..registry import MethodConfig, Regime, register
from .combine import weighted_sum


class LinearConfig(MethodConfig):
    normalize: bool = Field(True, description="divide by the sum of the weights (a weighted average)")


@register("merge", "linear", kind="merge", config=LinearConfig, regime=Regime.STREAMING, aliases=("soup", "uniform-soup"),
          paper="Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing "
                "inference time (Wortsman et al., 2022)",
          summary="weighted average of the models (uniform soup with equal weights)", min_models=1)
def linear(tensors, base, ctx):
    if ctx.cfg.normalize and abs(sum(ctx.weights)) < 1e-12:
        raise ValueError("linear merge weights sum to zero; set normalize: false or change the weights")
    return weighted_sum(tensors, ctx.weights, normalize=ctx.cfg.normalize)
