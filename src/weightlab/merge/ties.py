"""TIES-merging (Yadav et al., "TIES-Merging: Resolving interference when merging models", NeurIPS 2023).

trim (keep the top `density` share of each task vector by magnitude) -> elect a sign per
coordinate -> disjoint mean of the entries that agree with it -> base + lambda * merged.

Trimming modes: "topk" keeps exactly int(density*n) entries (as mergekit does);
"reference" is the paper code's kthvalue rule, which keeps int(density*n)+1 (plus ties).
Scope: "tensor" trims each tensor on its own (mergekit's `density`); "global" trims each
task vector over all of its parameters at once, as the paper's code does (flattening the
whole model); the global threshold is found exactly in two streaming passes.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..registry import MethodConfig, Regime, register
from ..tensor.masks import kth_largest_abs, kth_threshold_mask, topk_mask
from .chunked import Selector, ties_into, topk_selector
from .combine import disjoint_merge


class TiesConfig(MethodConfig):
    density: float = Field(0.2, gt=0, le=1, description="share of each task vector kept (paper: top 20%)")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")
    trim: Literal["topk", "reference"] = "topk"
    scope: Literal["tensor", "global"] = "tensor"
    zero_sign: Literal["majority", "positive"] = Field(
        "majority", description="sign where the summed trimmed vectors are exactly 0 (paper: majority; mergekit: +)")
    normalize: bool = Field(True, description="disjoint mean (True) or disjoint sum (False)")


def trim(delta: torch.Tensor, density: float, mode: str, threshold: float | None = None) -> torch.Tensor:
    if threshold is not None:  # global scope: the model-wide threshold
        return delta * (delta.abs() >= threshold)
    mask = topk_mask(delta, density) if mode == "topk" else kth_threshold_mask(delta, density)
    return delta * mask


def prepare_global(inputs, cfg: TiesConfig) -> dict:
    """Per task: the |tau| threshold over all its floating-point parameters."""
    if cfg.scope != "global":
        return {}
    plans = inputs.merged_plans()
    total = sum(inputs.base.info(tp.name).numel for tp in plans)
    thresholds = []
    for i in range(len(inputs.models)):
        def deltas(i=i):
            for tp in plans:
                yield inputs.load(i, tp) - inputs.load_base(tp)
        d = inputs_density(inputs, cfg, i)
        keep = int(d * total)
        # topk: the keep-th largest; reference: the (n - keep)-th smallest = the (keep+1)-th largest
        k = keep if cfg.trim == "topk" else keep + 1
        thresholds.append(0.0 if d >= 1 else kth_largest_abs(deltas, min(k, total)))
    return {"thresholds": thresholds}


def inputs_density(inputs, cfg, i: int) -> float:
    dens = getattr(inputs, "densities", None)
    return dens[i] if dens and dens[i] is not None else cfg.density


@register("merge", "ties", kind="merge", config=TiesConfig, regime=Regime.STREAMING, requires_base=True,
          prepare=prepare_global, raw_inputs=True, device_capable=True,
          paper="TIES-Merging: Resolving Interference When Merging Models (Yadav et al., 2023)",
          summary="trim small task-vector entries, elect signs, average the agreeing entries")
def ties(tensors, base, ctx):
    cfg: TiesConfig = ctx.cfg
    thr = ctx.state.get("thresholds")
    dtype = ctx.compute_dtype(tensors)
    # fused, chunked path (16-bit inputs on the CPU); same result as the plain path below, which is
    # also the one an accelerator takes (whole-tensor kernels beat the chunked CPU bookkeeping there)
    if dtype == torch.float32 and base.device.type == "cpu":
        n = base.numel()
        if thr:
            sels = [Selector(t, None) for t in thr]
        else:
            sels = []
            for i, t in enumerate(tensors):
                keep = n if ctx.density(i) >= 1 else int(ctx.density(i) * n)
                k = keep if cfg.trim == "topk" else keep + 1
                sels.append(Selector(0.0, None) if keep >= n else topk_selector(t, base, k, cfg.trim == "topk"))
        out = torch.empty(base.shape, dtype=ctx.output_dtype(tensors))
        return ties_into(out, tensors, base, sels, ctx.weights, cfg.zero_sign, cfg.normalize, cfg.lambda_)
    tensors, base = [t.to(dtype) for t in tensors], base.to(dtype)
    deltas = [trim(t - base, ctx.density(i), cfg.trim, thr[i] if thr else None) for i, t in enumerate(tensors)]
    return base + cfg.lambda_ * disjoint_merge(deltas, ctx.weights, cfg.zero_sign, cfg.normalize)
