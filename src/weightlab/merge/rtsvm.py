"""R-TSVM / RESM: TSV-M with outlier weighting and sparsity-aware rank selection.

Yang et al., "Mix Data or Merge Models? Balancing the Helpfulness, Honesty, and Harmlessness of
Large Language Model via Model Merging" (arXiv 2502.06876; v1/v2 "R-TSVM", v3 "RESM"). No code
is public and the method section's equations could not be read here (only the abstract was
reachable), so the two rules below are weightlab's reading of the abstract's wording, not a
verified transcription; docs/design.md ("R-TSVM") lists what is unverified.

Per 2-D weight, per task i (Delta_i = theta_i - theta_0, T tasks, m x n):
(i) outlier-aware *parameter* weighting ("heavy-tailed parameter distribution", "outlier
    mitigation", "preference noise accumulation"): an entry x of Delta_i with
    |x - mu_i| > kappa * sigma_i (mu, sigma: mean and population std of Delta_i's entries) is
    an outlier and gets the Huber weight w = kappa * sigma_i / |x - mu_i|; every other entry
    keeps w = 1. Delta~_i = w * Delta_i, so outliers are shrunk towards the kappa-sigma band and
    cannot dominate the task's singular vectors or pile up when tasks are summed.
(ii) sparsity-aware rank per *layer* ("layer sparsity adaptation"): s_i = share of entries of
    Delta~_i with |x| <= tol * max|Delta~_i|; the layer's sparsity is s = mean_i s_i and every
    task keeps k = max(1, floor((1 - s) * min(m, n) / T)) triplets, i.e. TSV-M's budget
    floor(min(m, n) / T) scaled by the layer's density.
Then Delta = TSV-M(Delta~_1..T, k) and theta = theta_0 + alpha * Delta; other tensors take the
mean of the task vectors, as in TSV-M.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field

from ..registry import Regime, register
from .tsv import TsvConfig, _is_matrix, tsv_merge_matrix


class RTsvConfig(TsvConfig):
    outlier_weighting: bool = Field(True, description="(i) shrink entries beyond kappa sigma (Huber weight)")
    kappa: float = Field(3.0, gt=0, description="outlier threshold in standard deviations of the task vector "
                                                "[ours: the paper's constant could not be read]")
    sparsity_rank: bool = Field(True, description="(ii) per-layer rank scaled by the layer's density")
    sparsity_tol: float = Field(0.01, ge=0, lt=1, description="|x| <= tol * max|x| counts as zero for the "
                                                              "layer sparsity [ours]")


def outlier_weights(delta: torch.Tensor, kappa: float) -> torch.Tensor:
    """Per-entry weights: 1 inside mean +- kappa*std, kappa*std/|x - mean| outside (Huber)."""
    mu = delta.mean()
    sigma = delta.std(unbiased=False)
    dev = (delta - mu).abs()
    if sigma <= 0:
        return torch.ones_like(delta)
    band = kappa * sigma
    # where dev <= band the ratio is >= 1 and the clamp gives exactly 1
    return (band / dev.clamp_min(torch.finfo(delta.dtype).tiny)).clamp(max=1.0)


def sparsity(delta: torch.Tensor, tol: float) -> float:
    """Share of entries with |x| <= tol * max|x| (1.0 for an all-zero update)."""
    a = delta.abs()
    top = a.max()
    if top <= 0:
        return 1.0
    return float((a <= tol * top).float().mean())


def layer_rank(deltas: list[torch.Tensor], tol: float) -> int:
    """k = max(1, floor((1 - mean_i s_i) * min(m, n) / T)), shared by every task of the layer."""
    s = sum(sparsity(d, tol) for d in deltas) / len(deltas)
    budget = min(deltas[0].shape) / len(deltas)
    # the small slack keeps exact products such as 0.75 * 8 = 6 from flooring to 5
    return max(1, math.floor((1.0 - s) * budget + 1e-9))


def rtsvm_matrix(deltas: list[torch.Tensor], cfg: RTsvConfig) -> torch.Tensor:
    """The merged update Delta of one 2-D weight (before alpha)."""
    if cfg.outlier_weighting:
        deltas = [outlier_weights(d, cfg.kappa) * d for d in deltas]
    if cfg.sparsity_rank:
        k = layer_rank(deltas, cfg.sparsity_tol)
    else:
        k = min(deltas[0].shape) // len(deltas)
    return tsv_merge_matrix(deltas, k, cfg.rel_eps)


@register("merge", "r-tsvm", kind="merge", config=RTsvConfig, regime=Regime.STREAMING, requires_base=True,
          aliases=("resm", "rtsvm"), device_capable=True,
          paper="Mix Data or Merge Models? Balancing the Helpfulness, Honesty, and Harmlessness of LLMs via "
                "Model Merging (Yang et al., arXiv 2502.06876; v3 calls it RESM). Equations not verified: "
                "weightlab's reading of the abstract, see docs/design.md",
          summary="TSV-M on Huber-weighted task vectors (entries beyond kappa sigma shrunk) with one rank per "
                  "layer scaled by the layer's density")
def r_tsvm(tensors, base, ctx):
    cfg: RTsvConfig = ctx.cfg
    deltas = [t - base for t in tensors]
    if not _is_matrix(ctx.name, base, cfg.exclude, len(deltas)):
        return base + torch.stack(deltas).mean(0)
    return base + cfg.alpha * rtsvm_matrix(deltas, cfg)
