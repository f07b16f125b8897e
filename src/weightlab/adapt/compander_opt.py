"""The modified adaptive optimizer Weight Compander uses with Adam (Sec. III-A3, after Powerpropagation).

Adam's step is invariant to rescaling the gradient, so on v it would cancel the factor dPsi/dv that
Eq. (2) puts in the gradient, and with it the compander's effect. The modified step computes Adam on
the raw gradient dL/dw = (dL/dv) / (dPsi/dv) and multiplies the resulting step by dPsi/dv. weightlab's
AdamW also takes its decoupled decay in w (step + weight_decay * w, then times dPsi/dv), as the paper
decays w = Psi(v). Parameters without a compander tag get plain AdamW (bit-equal to torch's, foreach off).
"""
from __future__ import annotations

import torch


class CompanderAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                tag = getattr(p, "_wc_slope", None)
                if tag is None:
                    g, s = p.grad, None
                else:
                    w, s = tag()
                    g = p.grad / s.clamp_min(1e-30)  # dL/dw; s > 0 for every built-in compander
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                t = st["step"]
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
                upd = (m / (1 - b1 ** t)) / denom
                if s is None:
                    p.mul_(1 - lr * wd)  # torch AdamW's order: decay first, then the Adam step
                    p.sub_(lr * upd)
                else:
                    p.sub_(lr * (upd + wd * w) * s)
        return loss
