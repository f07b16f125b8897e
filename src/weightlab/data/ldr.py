"""LDR-KL and adaptive ALDR-KL losses (Zhu, Ying & Yang, ICML 2023).

LDR-KL_i = lam * log( mean_k exp((c [k != y] + z_k - z_y) / lam) ) on normalised logits z: the
worst case over label distributions p of sum_k p_k (c [k != y] + z_k - z_y) - lam KL(p || uniform).
lam -> 0: Crammer-Singer max-margin loss; lam -> inf: the mean margin. ALDR-KL keeps one lam_i
per training sample and adapts it to how confident the model is on that sample.

    crit = LDRKLLoss()                         # or ALDRKLLoss(num_samples=len(train_set))
    loss = crit(model(x), y)                   # ALDR: crit(model(x), y, ids) with sample ids
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from ..tensor.reweight import aldr_kl, ldr_kl

PAPER = ("Label Distributionally Robust Losses for Multi-class Classification: Consistency, Robustness and "
         "Adaptivity (Zhu, Ying & Yang, ICML 2023)")
Normalize = Literal["softplus", "l1", "softplus-l1", "none"]
Reduction = Literal["mean", "sum", "none"]


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    return x.mean() if reduction == "mean" else x.sum() if reduction == "sum" else x


class LDRKLConfig(MethodConfig):
    lam: float = Field(10.0, gt=0, alias="lambda", description="temperature lambda")
    margin: float = Field(0.1, ge=0, description="margin c added to every wrong class")
    normalize: Normalize = Field("softplus", description="logit normalisation (reference: softplus(z) / mean)")
    reduction: Reduction = "mean"


class LDRKLLoss(nn.Module):
    """LDR-KL loss as a criterion: forward(logits, target) -> loss (reduced as configured)."""

    def __init__(self, cfg: LDRKLConfig | None = None, **params):
        super().__init__()
        self.cfg = cfg if cfg is not None else LDRKLConfig(**params)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        c = self.cfg
        return _reduce(ldr_kl(logits, target, c.lam, c.margin, c.normalize), c.reduction)


class ALDRKLConfig(MethodConfig):
    lam0: float = Field(10.0, gt=0, alias="lambda0", description="reference temperature lambda_0 (initial lambda_i)")
    margin: float = Field(0.1, ge=0)
    alpha: float = Field(2.0, gt=1, description="strength of the pull towards lambda_0; must be > 1")
    normalize: Normalize = Field("l1", description="reference: z / (||z||_1 / K); 'softplus-l1' for CIFAR-100")
    reduction: Reduction = "mean"


class ALDRKLLoss(nn.Module):
    """Adaptive LDR-KL: one temperature per training sample (buffer `lambdas`, updated each forward).

    forward(logits, target, ids) needs each sample's index into the training set.
    """

    def __init__(self, num_samples: int, cfg: ALDRKLConfig | None = None, **params):
        super().__init__()
        if num_samples < 1:
            raise ConfigError(f"ALDR-KL needs the number of training samples (>= 1); got {num_samples}")
        self.cfg = cfg if cfg is not None else ALDRKLConfig(**params)
        self.register_buffer("lambdas", torch.full((num_samples,), float(self.cfg.lam0)))

    def forward(self, logits: torch.Tensor, target: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        if ids is None:
            raise ConfigError("ALDR-KL needs the sample ids: loss = crit(logits, target, ids)")
        c = self.cfg
        ids = torch.as_tensor(ids, device=self.lambdas.device).long()
        loss, lam = aldr_kl(logits, target, self.lambdas[ids].to(logits.dtype), c.lam0, c.margin, c.alpha,
                            c.normalize)
        self.lambdas[ids] = lam.detach().to(self.lambdas.dtype)
        return _reduce(loss, c.reduction)


@register("data", "ldr-kl", paper=PAPER, config=LDRKLConfig, regime=Regime.WHOLE_MODEL, kind="loss",
          summary="label-distributionally robust KL loss lam*log mean_k exp((c*1{k!=y}+z_k-z_y)/lam), normalised logits")
def ldr_kl_loss(cfg: LDRKLConfig | None = None, **params) -> LDRKLLoss:
    return LDRKLLoss(cfg, **params)


@register("data", "aldr-kl", paper=PAPER, config=ALDRKLConfig, regime=Regime.WHOLE_MODEL, kind="loss",
          summary="adaptive LDR-KL: a per-sample temperature that shrinks as the model grows confident")
def aldr_kl_loss(cfg: ALDRKLConfig | None = None, num_samples: int = 0, **params) -> ALDRKLLoss:
    return ALDRKLLoss(num_samples, cfg, **params)
