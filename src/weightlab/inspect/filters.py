"""Convolution filter quality per conv layer (CNN Filter DB): sparsity, variance entropy, orthogonality."""
from __future__ import annotations

import re

from pydantic import Field

from ..engine.progress import progress
from ..registry import MethodConfig, Regime, register
from ..tensor.filters import SPARSITY_EPS, filter_quality
from ..tensor.spectral import to_numpy


class FiltersConfig(MethodConfig):
    sparsity_eps: float = Field(SPARSITY_EPS, gt=0, lt=1, description="a filter is sparse if all |w| < eps * max|w|")
    only_3x3: bool = Field(False, description="only 3x3 kernels (the reference's selection)")


@register("inspect", "filters", config=FiltersConfig, regime=Regime.STREAMING, kind="report",
          paper="Gavrikov & Keuper, CNN Filter DB: an empirical investigation of trained convolutional filters "
                "(CVPR 2022)",
          summary="per conv layer with spatial kernels: filter sparsity, variance entropy (raw, normalised, clean), "
                  "orthogonality, degenerate-layer flags")
def filters(source, cfg: FiltersConfig = FiltersConfig(), show_progress: bool | None = None) -> dict:
    names = []
    for n in source.names():
        info = source.info(n)
        if info.dtype.is_floating_point and len(info.shape) == 4 and info.shape[2] * info.shape[3] > 1:
            if not cfg.only_3x3 or tuple(info.shape[2:]) == (3, 3):
                names.append(n)
    layers = []
    for n in progress(names, "conv filters", enabled=show_progress):
        q = filter_quality(to_numpy(source.get(n)), cfg.sparsity_eps)
        layers.append({"name": n, "shape": list(source.info(n).shape), **q})
    flagged = [{"name": r["name"], "flags": r["flags"]} for r in layers if r["flags"]]
    depth = [int(m.group(1)) if (m := re.search(r"(?:^|\.)(\d+)(?:\.|$)", r["name"])) else None for r in layers]
    return {"layers": layers, "summary": {"layers": len(layers), "flagged": flagged,
                                          "blocks": sorted({d for d in depth if d is not None})}}
