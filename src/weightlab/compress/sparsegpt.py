"""SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", 2023)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..registry import MethodConfig, Regime, register
from ..tensor.obs import solver_dtype, sparsegpt as sparsegpt_solve
from .rules import LayerContext


class SparseGPTConfig(MethodConfig):
    blocksize: int = Field(128, gt=0, description="lazy-update column block")
    percdamp: float = Field(0.01, ge=0, description="damping as a share of mean diag(H)")
    precision: Literal["auto", "float64", "float32"] = Field(
        "auto", description="solver precision: auto = float64 on the CPU (exact reference), float32 on accelerators")


@register("compress", "sparsegpt", kind="prune", config=SparseGPTConfig, regime=Regime.LAYERWISE,
          paper="SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot (Frantar & Alistarh, 2023)",
          summary="OBS pruning with a damped inverse Hessian, 128-column lazy blocks; updates the kept weights",
          needs=("hessian",))
def sparsegpt(ctx: LayerContext):
    w, mask, loss = sparsegpt_solve(ctx.weight, ctx.stats.take_H(), ctx.sparsity, ctx.nm, ctx.cfg.blocksize,
                                    ctx.cfg.percdamp, solver_dtype(ctx.cfg.precision, ctx.weight.device), own_h=True)
    ctx.extra.setdefault("losses", {})[ctx.name] = loss
    return w, mask
