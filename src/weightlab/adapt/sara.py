"""SaRA (Hu et al. 2024): fine-tune only the small-magnitude ("ineffective") weights.

For each adapted weight theta0, the trainable set is Omega = {|theta0| < eps} with an absolute
threshold eps (README 2e-3), or the smallest ``fraction`` by magnitude. The weight used in the
forward is theta0 with theta[Omega] replaced by a dense 1-D trainable vector v = theta0[Omega]
(unstructural backprop): gradients and Adam state have |Omega| entries, never out*in, and the
frozen entries are never written.

Nuclear-norm term lambda_rank * ||Omega ⊙ theta||_* on one randomly chosen weight with
min(out, in) > ``nuclear_min_dim`` per step (computed from v, so its gradient reaches the
trained vector). Before the first ``adapt.step_hooks`` call every eligible layer takes part
(the mean over layers is the expectation of the random pick).

Progressive re-selection at step ``progressive_iter``: Omega2 = {|theta_T| < eps} on the
current weights; entries that leave Omega keep their trained values (frozen from then on), the
trainable vector is rebuilt and its optimizer state reset (:class:`SaraAdamW` notices the new
shape), as in the reference's memory-saving path.

Not copied from the reference: it writes |v| into the model at construction (negative small
weights flip sign until the first step), and its nuclear-norm gradient lands on Parameters
outside the optimizer (the term does nothing). Paper learning rate when none is chosen:
:func:`paper_lr` = 1e-3 * exp(-350 eps); AdamW betas (0.9, 0.999), weight decay 1e-2.
"""
from __future__ import annotations

import math
import random

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from . import _sparse
from .layer import AdapterMethod


class SaraConfig(MethodConfig):
    eps: float = 2e-3
    fraction: float | None = None  # instead of eps: train the smallest fraction of each weight
    lambda_rank: float = 5e-4
    nuclear_min_dim: int = 64
    progressive_iter: int | None = 2500
    weight_decay: float = 1e-2
    seed: int = 0


def paper_lr(eps: float) -> float:
    """The reference's learning rate when none is passed: 1e-3 * exp(-350 eps) (4.97e-4 at eps 2e-3)."""
    return 1e-3 * math.exp(-350 * eps)


def small_support(W: torch.Tensor, eps: float, fraction: float | None) -> torch.Tensor:
    a = W.abs().reshape(-1)
    if fraction is not None:
        k = int(fraction * a.numel())
        return torch.sort(a, stable=True).indices[:k].sort().values
    return torch.nonzero(a < eps).reshape(-1)


def count(W: torch.Tensor, eps: float = 2e-3, fraction: float | None = None) -> int:
    """Trainable entries of one weight: #{|w| < eps}, or floor(fraction * numel)."""
    return int(fraction * W.numel()) if fraction is not None else int((W.abs() < eps).sum())


@register("adapt", "sara", kind="adapter", regime=Regime.WHOLE_MODEL, config=SaraConfig,
          paper="Hu et al. 2024, SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse "
                "Low-Rank Adaptation (arXiv 2409.06633)",
          summary="train only the entries with |w| < eps (no dense gradients), nuclear-norm term, re-selection",
          layers="linear, conv1d", trainable="#{|w| < eps} per weight")
class SaRA(AdapterMethod):
    name = "sara"
    materialize = True
    invertible = False  # the merged weight overwrites theta0[Omega]

    def create(self, layer, W0, init=True):
        a = layer.adapter
        idx = small_support(W0, self.cfg.eps, self.cfg.fraction)
        a.values = nn.Parameter(W0.reshape(-1)[idx].clone())  # signed: no sign flip at the start
        a.register_buffer("index", idx)
        a.register_buffer("kept_index", torch.zeros(0, dtype=torch.long))
        a.register_buffer("kept_values", torch.zeros(0))
        _sparse.resize_on_load(a, ("values", "index", "kept_index", "kept_values"))
        layer.reg_active = True
        return W0

    def weight(self, layer, W):
        a = layer.adapter
        if a.kept_index.numel():
            W = _sparse.replace(W, a.kept_index, a.kept_values)
        return _sparse.replace(W, a.index, a.values)

    def delta(self, layer, W):
        return self.weight(layer, W.float()) - W.float()

    def forward(self, layer, x):
        return layer.functional(x, self.weight(layer, layer.weight_2d()).to(x.dtype))

    def regularizer(self, layer):
        if self.cfg.lambda_rank <= 0 or not layer.reg_active or min(layer.out_features, layer.in_features) <= \
                self.cfg.nuclear_min_dim:
            return None
        a = layer.adapter
        M = _sparse.scatter(a.values.float(), a.index, (layer.out_features, layer.in_features))
        return torch.linalg.matrix_norm(M, ord="nuc"), 1

    def regularizer_weight(self) -> float:
        return self.cfg.lambda_rank

    @classmethod
    def on_model_step(cls, layers, step, total_steps):
        cfg = layers[0].method.cfg
        if cfg.progressive_iter and step == cfg.progressive_iter:
            for layer in layers:
                reselect(layer)
        eligible = [l for l in layers if min(l.out_features, l.in_features) > cfg.nuclear_min_dim]
        pick = random.Random(cfg.seed * 1_000_003 + step).randrange(len(eligible)) if eligible else -1
        for i, l in enumerate(eligible):
            l.reg_active = i == pick

    def trainable_count(self, out_f, in_f):
        raise NotImplementedError("sara's trainable count depends on the weights: see sara.count(W, eps)")

    @classmethod
    def peft_factors(cls, t, cfg, W0, svd_rank):
        if W0 is None or not svd_rank:
            raise ConfigError("sara's update is sparse, not LoRA-shaped: merge it, or export an SVD-truncated LoRA "
                              "(svd_rank=..., --svd-rank) with the base model")
        from ..tensor.svd import lowrank_factor

        W = W0.float()
        Wt = _sparse.replace(_sparse.replace(W, t["kept_index"], t["kept_values"].float()), t["index"],
                             t["values"].float())
        return lowrank_factor(Wt - W, svd_rank)

    @staticmethod
    def make_optimizer(params, lr, cfg, weight_decay=0.0):
        return SaraAdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay or cfg.weight_decay)


@torch.no_grad()
def reselect(layer) -> None:
    """Omega2 = {|theta| < eps} on the current weight; leavers keep their trained values, frozen."""
    a, cfg = layer.adapter, layer.method.cfg
    W0 = layer.weight_2d().float()
    Wt = layer.method.weight(layer, W0)
    new = small_support(Wt, cfg.eps, cfg.fraction)
    changed = torch.cat([a.kept_index, a.index]).unique()
    changed = changed[~torch.isin(changed, new)]
    a.kept_index = changed
    a.kept_values = Wt.reshape(-1)[changed].clone()
    a.index = new
    a.values.data = Wt.reshape(-1)[new].clone()
    a.values.grad = None


class SaraAdamW(torch.optim.AdamW):
    """AdamW that resets a parameter's state when its size changed (SaRA's re-selection)."""

    @torch.no_grad()
    def step(self, closure=None):
        for grp in self.param_groups:
            for p in grp["params"]:
                st = self.state.get(p)
                if st and "exp_avg" in st and st["exp_avg"].shape != p.shape:
                    del self.state[p]
        return super().step(closure)
