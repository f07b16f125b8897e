"""PST (Li et al. 2022): parameter-efficient sparse training with low-rank importance factors.

W_eff = M ⊙ (W + beta U V), W frozen, U (out x r) ~ N(0, 1), V (r x in) = 0.
Importance S = |W + beta U V| + alpha1 A B + alpha2 (R 1^T + 1 C^T): a data-free magnitude
term, a low-rank data-driven term (A out x r' ~ N(0, 1), B r' x in = 0) and a structured
row/column term (R, C = 0). M zeroes the floor(sparsity * numel) lowest scores; its gradient is
a straight-through estimator (dL/dS = dL/dM, elementwise).

Sparsity follows the cubic schedule of :func:`cubic_sparsity` over training, advanced by
``adapt.step_hooks`` (in ``weightlab tune``). At sparsity 0 the output is exactly the base.
Merging gives the sparse weight M ⊙ (W + beta U V) and drops every factor.
Parameters r(in+out) + r'(in+out) + out + in. Defaults (paper/code): r = r' = 8,
beta = alpha1 = alpha2 = 1, s_i = 0, s_f = 0.9, w_i = 0.1, w_f = 0.3.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from .layer import AdapterMethod, rank_of


class PstConfig(MethodConfig):
    r: int = 8
    r_score: int = 8  # r' of the importance factors A, B
    beta: float = 1.0
    alpha1: float = 1.0
    alpha2: float = 1.0
    initial_sparsity: float = 0.0
    final_sparsity: float = 0.9
    initial_warmup: float = 0.1
    final_warmup: float = 0.3
    seed: int = 0


def cubic_sparsity(step: int, total: int, s_i: float = 0.0, s_f: float = 0.9, w_i: float = 0.1,
                   w_f: float = 0.3) -> float:
    """s_i for t <= w_i T, s_f for t > T - w_f T, else s_f + (s_i - s_f)(1 - (t - w_i T)/(T - (w_i + w_f) T))^3."""
    T = total
    if step <= w_i * T:
        return s_i
    if step > T - w_f * T:
        return s_f
    span = T - (w_i + w_f) * T
    return s_f + (s_i - s_f) * (1 - (step - w_i * T) / span) ** 3


class TopMask(torch.autograd.Function):
    """1 except the k lowest scores (0); the backward passes the gradient straight through."""

    @staticmethod
    def forward(ctx, scores, k: int):
        mask = torch.ones_like(scores)
        if k > 0:
            mask.view(-1)[torch.sort(scores.reshape(-1), stable=True).indices[:k]] = 0
        return mask

    @staticmethod
    def backward(ctx, g):
        return g, None


@register("adapt", "pst", kind="adapter", regime=Regime.WHOLE_MODEL, config=PstConfig,
          paper="Li et al. 2022, Parameter-Efficient Sparsity for Large Language Models Fine-Tuning "
                "(IJCAI 2022, arXiv 2205.11005)",
          summary="sparse fine-tuning: mask from low-rank + structured importance (STE), cubic sparsity schedule",
          layers="linear, conv1d", trainable="(r + r')*(in+out) + out + in")
class PST(AdapterMethod):
    name = "pst"
    materialize = True
    invertible = False  # pruned entries cannot be recovered from the merged weight

    def create(self, layer, W0, init=True):
        out_f, in_f = W0.shape
        c = self.cfg
        r, r2 = rank_of(c.r, out_f, in_f), rank_of(c.r_score, out_f, in_f)
        g = torch.Generator().manual_seed(c.seed)
        a = layer.adapter
        a.U = nn.Parameter(torch.randn(out_f, r, generator=g) if init else torch.zeros(out_f, r))
        a.V = nn.Parameter(torch.zeros(r, in_f))
        a.A = nn.Parameter(torch.randn(out_f, r2, generator=g) if init else torch.zeros(out_f, r2))
        a.B = nn.Parameter(torch.zeros(r2, in_f))
        a.R = nn.Parameter(torch.zeros(out_f))
        a.C = nn.Parameter(torch.zeros(in_f))
        # float64 so a saved 0.9 reads back as 0.9; the float attribute drives the mask (survives .to(bf16))
        a.register_buffer("sparsity", torch.tensor(float(c.initial_sparsity), dtype=torch.float64))
        layer.sparsity = float(c.initial_sparsity)
        return W0

    def rebase(self, layer, W0):
        layer.sparsity = float(layer.adapter.sparsity)
        return W0

    def scores(self, layer, Wd):
        a, c = layer.adapter, self.cfg
        return Wd.abs() + c.alpha1 * (a.A @ a.B) + c.alpha2 * (a.R[:, None] + a.C[None, :])

    def weight(self, layer, W):
        a = layer.adapter
        Wd = W + self.cfg.beta * (a.U @ a.V)
        k = int(layer.sparsity * Wd.numel())
        return TopMask.apply(self.scores(layer, Wd), k) * Wd

    def delta(self, layer, W):
        return self.weight(layer, W.float()) - W.float()

    def forward(self, layer, x):
        return layer.functional(x, self.weight(layer, layer.weight_2d().float()).to(x.dtype))

    def on_step(self, layer, step, total_steps):
        set_sparsity(layer, cubic_sparsity(step, total_steps, self.cfg.initial_sparsity, self.cfg.final_sparsity,
                                           self.cfg.initial_warmup, self.cfg.final_warmup))

    def trainable_count(self, out_f, in_f):
        r, r2 = rank_of(self.cfg.r, out_f, in_f), rank_of(self.cfg.r_score, out_f, in_f)
        return (r + r2) * (out_f + in_f) + out_f + in_f

    @classmethod
    def peft_factors(cls, t, cfg, W0, svd_rank):
        if W0 is None or not svd_rank:
            raise ConfigError("pst's update is a sparse mask, not LoRA-shaped: merge it (sparse weights), or export "
                              "an SVD-truncated LoRA (svd_rank=..., --svd-rank) with the base model")
        from ..tensor.svd import lowrank_factor

        W = W0.float()
        Wd = W + cfg.beta * (t["U"].float() @ t["V"].float())
        S = Wd.abs() + cfg.alpha1 * (t["A"].float() @ t["B"].float()) + cfg.alpha2 * (t["R"].float()[:, None]
                                                                                      + t["C"].float()[None, :])
        Wm = TopMask.apply(S, int(float(t["sparsity"]) * W.numel())) * Wd
        return lowrank_factor(Wm - W, svd_rank)


def set_sparsity(layer, sparsity: float) -> None:
    """Set a PST layer's current sparsity (what the schedule does each step)."""
    layer.sparsity = float(sparsity)
    layer.adapter.sparsity.fill_(float(sparsity))


__all__ = ["PST", "PstConfig", "TopMask", "cubic_sparsity", "set_sparsity"]
