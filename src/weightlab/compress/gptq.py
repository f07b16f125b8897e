"""GPTQ (Frantar et al., 2023): OBS error feedback with a damped inverse Hessian (tensor/gptq.py)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..registry import MethodConfig, Regime, register
from ..tensor.gptq import gptq as gptq_solve
from ..tensor.obs import solver_dtype
from .quantize import QUANT_KIND, QuantContext


class GPTQConfig(MethodConfig):
    blocksize: int = Field(128, gt=0, description="lazy-update column block (rounded to a multiple of the group)")
    percdamp: float = Field(0.01, ge=0, description="damping as a share of mean diag(H)")
    act_order: bool = Field(False, description="quantize columns by descending diag(H)")
    static_groups: bool = Field(False, description="fit group grids once on the original W")
    precision: Literal["auto", "float64", "float32"] = Field(
        "auto", description="solver precision: auto = float64 on the CPU (exact reference), float32 on accelerators "
                            "(as the reference code; half the memory of the d_in x d_in factors)")


@register("compress", "gptq", kind=QUANT_KIND, config=GPTQConfig, regime=Regime.LAYERWISE,
          paper="GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers "
                "(Frantar et al., 2023)",
          summary="column-by-column rounding with inverse-Hessian error feedback; groups, act-order, static groups",
          default_bits=4, needs=("hessian",))
def gptq(ctx: QuantContext):
    c = ctx.cfg
    # take_H: the statistics hand their Hessian over, so it is damped and factored in place
    q, loss = gptq_solve(ctx.weight, ctx.stats.take_H(), ctx.bits, ctx.group_size, ctx.sym, c.act_order,
                         c.static_groups, c.blocksize, c.percdamp, ctx.scale_dtype,
                         solver_dtype(c.precision, ctx.weight.device), own_h=True, keep=ctx.keep)
    ctx.extra["loss"] = loss
    return q
