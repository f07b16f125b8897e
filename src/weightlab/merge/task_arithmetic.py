"""Task arithmetic (Ilharco et al., "Editing models with task arithmetic", ICLR 2023)."""
from __future__ import annotations

from pydantic import Field

import torch

from ..registry import MethodConfig, Regime, register
from .combine import nonzero_weight_sum
from .chunked import weighted_sum_into


class TaskArithmeticConfig(MethodConfig):
    lambda_: float = Field(1.0, alias="lambda", description="scale of the summed task vectors")
    normalize: bool = Field(False, description="divide the summed task vectors by the sum of the weights")


@register("merge", "task-arithmetic", kind="merge", config=TaskArithmeticConfig, regime=Regime.STREAMING,
          aliases=("task_arithmetic",), requires_base=True, raw_inputs=True, check=nonzero_weight_sum,
          paper="Editing models with task arithmetic (Ilharco et al., 2023)",
          summary="base + lambda * sum of weighted task vectors; a negative weight negates (forgets) a task")
def task_arithmetic(tensors, base, ctx):
    out = torch.empty(base.shape, dtype=ctx.output_dtype(tensors))
    return weighted_sum_into(out, tensors, ctx.weights, ctx.compute_dtype(tensors), base=base,
                             lam=ctx.cfg.lambda_, normalize=ctx.cfg.normalize)
