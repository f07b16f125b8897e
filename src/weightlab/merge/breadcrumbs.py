"""Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling multi-task model merging with sparse
masks", 2023).

Each task vector loses its largest-magnitude outliers (the top ``gamma`` share) and its smallest entries,
so that a ``density`` share survives; the sparse task vectors are summed (``breadcrumbs``) or combined with
TIES' sign consensus (``combine: ties``, mergekit's ``breadcrumbs_ties``). Defaults are mergekit's.

mergekit keeps ``indices[n_bot:-n_top]`` of the ascending sort, which is empty when n_top = 0 (tensors with
fewer than 1/gamma entries, e.g. small norms): there the whole task vector is dropped. weightlab keeps the
entries the rule asks for (``n_bot:`` when nothing is cut at the top).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..registry import MethodConfig, Regime, register
from ..tensor.masks import topk_mask
from .combine import combine_deltas


class BreadcrumbsConfig(MethodConfig):
    density: float = Field(1.0, gt=0, le=1, description="share of each task vector kept (mergekit's default: 1, "
                                                         "nothing dropped; the paper keeps about 0.1)")
    gamma: float = Field(0.01, ge=0, lt=1, description="share of the largest-magnitude entries removed first")
    combine: Literal["linear", "ties"] = "linear"
    rescale: bool = Field(False, description="restore each sparsified task vector's L1 norm")
    normalize: bool = Field(False, description="divide by the (agreeing) weights' sum")
    lambda_: float = Field(1.0, alias="lambda")
    zero_sign: Literal["majority", "positive"] = Field("positive", description="TIES sign where the sum is 0")


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep int(density*n) entries: drop the top int(gamma*n) by magnitude, then the smallest.

    The top (keep + n_top) minus the top n_top, both exact top-k masks ordered by |delta| and then by
    index, so the count is exact with ties too, and no full sort (values + int64 indices) is held.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    keep = int(density * n)
    n_top = int(gamma * n)
    if n - keep - n_top < 0:  # fewer outliers removed so that the density is reached
        n_top = n - keep
    mask = topk_mask(delta, (keep + n_top) / n) if keep + n_top < n else torch.ones_like(delta, dtype=torch.bool)
    if n_top:
        mask &= ~topk_mask(delta, n_top / n)
    return mask


@register("merge", "breadcrumbs", kind="merge", config=BreadcrumbsConfig, regime=Regime.STREAMING,
          requires_base=True, aliases=("model-breadcrumbs",),
          paper="Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (Davari & Belilovsky, 2023)",
          summary="drop each task vector's outliers and small entries, then sum (or TIES-combine) them")
def breadcrumbs(tensors, base, ctx):
    cfg: BreadcrumbsConfig = ctx.cfg
    deltas = []
    for i, t in enumerate(tensors):
        d = t - base
        tensors[i] = None  # the engine's compute-dtype copy is not needed again: free it now
        before = d.abs().sum() if cfg.rescale else None
        d.mul_(breadcrumbs_mask(d, ctx.density(i), ctx.model_param(i, "gamma", cfg.gamma)))
        if before is not None:  # restore the L1 norm (mergekit's rescale; nothing to restore below 1e-7)
            after = d.abs().sum()
            if before >= 1e-7 and after >= 1e-7:
                d.mul_(before / after)
        deltas.append(d)
    merged = combine_deltas(deltas, ctx.weights, cfg.combine == "ties", cfg.normalize, cfg.zero_sign)
    return base + cfg.lambda_ * merged
