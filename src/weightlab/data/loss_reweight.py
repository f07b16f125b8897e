"""Dynamic loss-based sample reweighting (Sow et al., ICLR 2025) as a drop-in for any training loop.

    rw = LossReweighter(strategy="linupper", temperature=0.4, burn_in=1000)
    for x, y in loader:
        losses = F.cross_entropy(model(x), y, reduction="none")   # one loss per sample / sequence
        loss = rw(losses)                                          # sum_i w_i * losses_i
        loss.backward(); opt.step(); opt.zero_grad()

Per step: h_i = (2 L_i - (L_max + L_min)) / max(L_max - L_min, 1e-6) in [-1, 1]; f(h) by strategy
(LinUpper min(h + 1, 1), Quadratic 1 - h^2, Extremes |h|, Upper (h + 1) / 2); w = softmax(f(h) / r),
detached. The first `burn_in` steps are uniform (plain mean). In multi-process training, gather the
losses of the global batch first, as the reference does.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from ..registry import MethodConfig, Regime, register
from ..tensor.reweight import STRATEGY_ALIASES, loss_reweight_weights

PAPER = "Dynamic Loss-Based Sample Reweighting for Improved Large Language Model Pretraining (Sow et al., ICLR 2025)"


class LossReweightConfig(MethodConfig):
    strategy: Literal["linupper", "quadratic", "extremes", "upper", "uniform"] = Field(
        "linupper", description="f(h): linupper, quadratic (reference 'mid'), extremes, upper, uniform")
    temperature: float = Field(0.4, gt=0, description="r (reference kl_reg): larger = closer to uniform")
    burn_in: int = Field(1000, ge=0, description="first steps with uniform weights (reference 'burnout_steps')")

    @field_validator("strategy", mode="before")
    @classmethod
    def _alias(cls, v):
        return STRATEGY_ALIASES.get(v, v)


class LossReweighter:
    """Turns per-sample losses into the weighted loss sum_i w_i L_i; counts its own steps for the burn-in."""

    def __init__(self, cfg: LossReweightConfig | None = None, **params):
        self.cfg = cfg if cfg is not None else LossReweightConfig(**params)
        if cfg is not None and params:
            self.cfg = cfg.model_copy(update=params)
        self.step = 0
        self.last_weights: torch.Tensor | None = None

    def weights(self, losses: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        """Weights (sum 1, detached) for this step, without advancing the step counter."""
        strategy = "uniform" if self.step < self.cfg.burn_in else self.cfg.strategy
        return loss_reweight_weights(losses, strategy, self.cfg.temperature, counts)

    def __call__(self, losses: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted loss (differentiable in `losses`); advances the step counter."""
        flat = losses.reshape(-1)
        w = self.weights(flat, counts).to(flat.dtype)
        self.last_weights = w
        self.step += 1
        return (w * flat).sum()

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


@register("data", "loss-reweight", paper=PAPER, config=LossReweightConfig, regime=Regime.WHOLE_MODEL, kind="reweighter", summary="per-sample weights softmax(f(h(loss))/r) (LinUpper, Quadratic, Extremes) "
                                     "with burn-in, as a weighted training loss")
def loss_reweight(cfg: LossReweightConfig | None = None, **params) -> LossReweighter:
    """A LossReweighter for a training loop (see the module docstring)."""
    return LossReweighter(cfg, **params)
