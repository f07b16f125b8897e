"""Cast floating-point tensors to a smaller dtype (streaming). Integer buffers are never touched."""
from __future__ import annotations

import fnmatch
from dataclasses import replace
from typing import Literal

from pydantic import Field

from ..engine.source import MappedSource
from ..io.dtypes import parse_dtype
from ..registry import MethodConfig, Regime, register


class CastConfig(MethodConfig):
    dtype: Literal["bfloat16", "float16", "float32", "float64"] = "bfloat16"
    keep: list[str] = Field(default_factory=list,
                            description="glob patterns of tensor names kept in their original dtype")


@register("compress", "cast", paper="(dtype conversion; no paper)", config=CastConfig, regime=Regime.STREAMING,
          summary="cast floating-point tensors to bfloat16/float16/float32, integer buffers untouched")
def cast(source, cfg: CastConfig = CastConfig()):
    target = parse_dtype(cfg.dtype)

    def applies(name: str, dtype) -> bool:
        return dtype.is_floating_point and not any(fnmatch.fnmatchcase(name, p) for p in cfg.keep)

    def fn(name, t):
        return t.to(target) if applies(name, t.dtype) else t

    def info_fn(info):
        return replace(info, dtype=target) if applies(info.name, info.dtype) else info

    return MappedSource(source, fn, info_fn)
