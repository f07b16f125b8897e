"""Passthrough: copy one model's tensors (optionally scaled); with `slices`, the frankenmerge building block."""
from __future__ import annotations

from pydantic import Field

from ..registry import MethodConfig, Regime, register


class PassthroughConfig(MethodConfig):
    scale: float = Field(1.0, description="multiply every tensor by this (mergekit's per-model `scale`)")


@register("merge", "passthrough", kind="merge", config=PassthroughConfig, regime=Regime.STREAMING,
          min_models=1, max_models=1, inputs=(1, 1),
          paper="mergekit's passthrough merge (layer stacking / frankenmerges with slices)",
          summary="copy one model's tensors unchanged (or scaled); stack layer ranges with slices")
def passthrough(tensors, base, ctx):
    s = ctx.model_param(0, "scale", ctx.cfg.scale)
    return tensors[0] if s == 1 else tensors[0] * s
