"""Round-to-nearest (RTN) quantization: the data-free baseline of GPTQ's paper (min-max grid, tensor/quant.py)."""
from __future__ import annotations

from ..registry import MethodConfig, Regime, register
from ..tensor.quant import rtn as rtn_solve
from .quantize import QUANT_KIND, QuantContext


class RTNConfig(MethodConfig):
    pass


@register("compress", "rtn", kind=QUANT_KIND, config=RTNConfig, regime=Regime.STREAMING,
          paper="GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers "
                "(Frantar et al., 2023), RTN baseline",
          summary="round-to-nearest min-max integer grid, per channel or per group, sym/asym, 2-8 bits",
          default_bits=4, needs=())
def rtn(ctx: QuantContext):
    return rtn_solve(ctx.weight, ctx.bits, ctx.group_size, ctx.sym, ctx.scale_dtype)
