"""FP8 (float8_e4m3fn) weights, as llm-compressor's FP8 / FP8_DYNAMIC presets (compressed-tensors 'float-quantized').

Data-free: each weight matrix gets one scale per output channel (FP8_DYNAMIC) or one for the whole tensor
(FP8), max |w| / 448, and its values are cast to e4m3 (round to nearest even) after division by it
(tensor/quant8.py). Activations are chosen by the quantize verb: FP8_DYNAMIC pairs channel weights with
dynamic per-token FP8 inputs, FP8 pairs tensor weights with a static per-tensor input scale.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from ..tensor.quant import SCALE_DTYPES
from ..tensor.quant8 import fp8_quantize
from .quantize import QUANT_KIND, QuantContext


class FP8Config(MethodConfig):
    strategy: Literal["channel", "tensor"] = Field(
        "channel", description="weight scales per output channel (FP8_DYNAMIC) or one per tensor (FP8)")


@register("compress", "fp8", kind=QUANT_KIND, config=FP8Config, regime=Regime.STREAMING,
          paper="FP8 Formats for Deep Learning (Micikevicius et al., 2022), e4m3 weights as llm-compressor's "
                "FP8 / FP8_DYNAMIC schemes",
          summary="float8_e4m3fn weights with per-channel or per-tensor scales (max|w| / 448); with --activations "
                  "dynamic or static: W8A8-FP8", default_bits=8, bits_range=(8, 8), needs=())
def fp8(ctx: QuantContext):
    if ctx.group_size > 0:
        raise ConfigError(f"fp8 scales are per channel or per tensor (strategy={ctx.cfg.strategy}), not in groups of "
                          f"{ctx.group_size}; pass --group-size -1 (group_size=-1)")
    return fp8_quantize(ctx.weight, ctx.cfg.strategy, SCALE_DTYPES[ctx.scale_dtype])
