"""KL-regularised DRO instance weights from doubly-robust instance-reweighted adversarial training (DONE, Sow et al.).

The inner problem max_{w in simplex} sum_i w_i l_i - r sum_i w_i log(n w_i) has the closed form
w = softmax(l / r); minimising sum_i w_i l_i with w held fixed gives exactly the batch gradient
of r log mean exp(l / r). Only the weighting is implemented here, not the attack: pass the
losses of adversarial examples (or any per-sample losses).

    rw = DROReweighter(temperature=1.0)
    loss = rw(F.cross_entropy(model(x_adv), y, reduction="none"))
"""
from __future__ import annotations

import math

import torch
from pydantic import Field

from ..registry import MethodConfig, Regime, register
from ..tensor.reweight import kl_dro_weights

PAPER = "Doubly Robust Instance-Reweighted Adversarial Training (Sow et al., ICLR 2024)"


class DROConfig(MethodConfig):
    """The paper's temperature is not verified here; 1.0 is weightlab's default.
    r -> inf gives uniform weights, r -> 0 all weight on the largest loss."""

    temperature: float = Field(1.0, gt=0, description="r, the KL regularisation strength")
    momentum: float | None = Field(None, gt=0, le=1, description="CID option: EMA rate of the running estimate "
                                                                     "u of mean exp(l / r); None = per-batch softmax")


class DROReweighter:
    """Per-sample losses -> sum_i w_i l_i with w = softmax(l / r) (detached), or the CID running-mean variant."""

    def __init__(self, cfg: DROConfig | None = None, **params):
        self.cfg = cfg if cfg is not None else DROConfig(**params)
        if cfg is not None and params:
            self.cfg = cfg.model_copy(update=params)
        self.log_u: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        r, beta = self.cfg.temperature, self.cfg.momentum
        if beta is None:
            return kl_dro_weights(losses, r)
        z = losses.detach().double().reshape(-1) / r
        batch_log_mean = torch.logsumexp(z, 0) - math.log(z.numel())
        if self.log_u is None:
            self.log_u = batch_log_mean
        elif beta < 1:
            self.log_u = torch.logaddexp(self.log_u + math.log(1 - beta), batch_log_mean + math.log(beta))
        else:
            self.log_u = batch_log_mean
        return kl_dro_weights(losses, r, log_u=self.log_u)

    def __call__(self, losses: torch.Tensor) -> torch.Tensor:
        """The weighted loss sum_i w_i l_i (differentiable in the losses, not through the weights)."""
        flat = losses.reshape(-1)
        w = self.weights(flat).to(flat.dtype)
        self.last_weights = w
        return (w * flat).sum()

    def state_dict(self) -> dict:
        return {"log_u": None if self.log_u is None else float(self.log_u)}

    def load_state_dict(self, state: dict) -> None:
        v = state.get("log_u")
        self.log_u = None if v is None else torch.tensor(float(v), dtype=torch.float64)


@register("data", "dro", paper=PAPER, config=DROConfig, regime=Regime.WHOLE_MODEL, kind="reweighter",
          summary="KL-regularised DRO instance weights softmax(loss / r) (the weighting of DONE, not its attack)")
def dro(cfg: DROConfig | None = None, **params) -> DROReweighter:
    return DROReweighter(cfg, **params)
