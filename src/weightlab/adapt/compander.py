"""Weight Compander (Cakaj, Mehnert, Yang, IJCNN 2023): every weight reparameterized as w = f(v; a, k).

The paper's exact function could not be retrieved (no code exists; only the abstract was read).
The function here is **weightlab's choice** with the properties the abstract asks for:

    f(v; a, k) = a * sign(v) * (1 - exp(-k |v| / a))          ("exp", the default)

- odd and strictly increasing; |f| < a: magnitudes are bounded by the per-layer bound a;
- f'(0) = k: with k > 1 small latents are expanded, and in terms of the weight the effective
  step size is f'(f^-1(w))^2 = k^2 (1 - |w|/a)^2: near-zero ("dead") weights move k^2 times
  faster than under plain training and weights near the bound stall, so training pushes weights
  away from zero and keeps them off the bound;
- a and k are learnable per layer (the paper's "learned" variant), stored as softplus-inverse
  latents so they stay positive.

Init inverts f, so the layer starts exactly at W0 (an identity start): v0 = f^-1(W0) with
a0 = ``bound_factor`` * max|W0| (default 2) unless ``bound`` is given. The compander is
pluggable: ``COMPANDERS[name] = (f, f_inverse)`` with f(v, a, k); "atan" is a second built-in
(a * 2/pi * atan(pi k v / (2a)), also slope k at 0, bounded by a). The merged weight is f(V):
the method is materialized (the forward builds W' = f(V)) and its merge is not invertible from W'
alone (the wrapper keeps the base for unmerge). Trainable: out*in + 2 per layer.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from .layer import AdapterMethod


def exp_compander(v: torch.Tensor, a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    # Not a*sign(v)*(...|v|...): autograd gives sign and abs slope 0 at v = 0, so exact-zero
    # weights (pruned ones) would never move. Both halves here stay finite for any v.
    vp = torch.where(v >= 0, v, 0.0)
    vn = torch.where(v < 0, v, 0.0)
    return a * (torch.expm1(k * vn / a) - torch.expm1(-k * vp / a))


def exp_compander_inverse(w: torch.Tensor, a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return -torch.sign(w) * (a / k) * torch.log1p(-w.abs() / a)


def atan_compander(v: torch.Tensor, a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return a * (2 / math.pi) * torch.atan(math.pi * k * v / (2 * a))


def atan_compander_inverse(w: torch.Tensor, a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return (2 * a / (math.pi * k)) * torch.tan(math.pi * w / (2 * a))


Compander = tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]
COMPANDERS: dict[str, Compander] = {"exp": (exp_compander, exp_compander_inverse),
                                    "atan": (atan_compander, atan_compander_inverse)}


def _softplus_inv(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class CompanderConfig(MethodConfig):
    fn: str = "exp"  # a key of COMPANDERS
    bound: float | None = None  # a0; None: bound_factor * max|W0| per layer
    bound_factor: float = 2.0
    steepness: float = 2.0  # k0 = f'(0)
    learn_hparams: bool = True  # the paper's learned-hyperparameter variant


@register("adapt", "compander", kind="adapter", regime=Regime.WHOLE_MODEL, config=CompanderConfig,
          paper="Cakaj, Mehnert, Yang 2023, Weight Compander: A Simple Weight Reparameterization for "
                "Regularization (IJCNN 2023, arXiv 2306.16993); the function is weightlab's choice",
          summary="w = f(v; a, k): odd, bounded (|w| < a), slope k at 0 pushing weights off zero; learnable a, k",
          layers="linear, conv1d, conv2d", trainable="out*in + 2")
class WeightCompander(AdapterMethod):
    name = "compander"
    layer_kinds = ("linear", "conv1d", "conv2d")
    materialize = True
    invertible = False

    def _fns(self) -> Compander:
        if self.cfg.fn not in COMPANDERS:
            raise ConfigError(f"unknown compander '{self.cfg.fn}'; known: {', '.join(sorted(COMPANDERS))}")
        return COMPANDERS[self.cfg.fn]

    def create(self, layer, W0, init=True):
        f, finv = self._fns()
        a0 = self.cfg.bound if self.cfg.bound is not None else self.cfg.bound_factor * float(W0.abs().max())
        if init and (a0 <= 0 or float(W0.abs().max()) >= a0):
            raise ConfigError(f"compander bound {a0:g} must exceed max|W| = {float(W0.abs().max()):g} of "
                              f"'{layer.layer_name}' (raise bound or bound_factor above 1)")
        if self.cfg.steepness <= 0:
            raise ConfigError(f"compander steepness must be > 0, got {self.cfg.steepness}")
        ad = layer.adapter
        a_lat = torch.tensor(_softplus_inv(max(a0, 1e-12)))
        k_lat = torch.tensor(_softplus_inv(self.cfg.steepness))
        if self.cfg.learn_hparams:
            ad.a_latent, ad.k_latent = nn.Parameter(a_lat), nn.Parameter(k_lat)
        else:
            ad.register_buffer("a_latent", a_lat)
            ad.register_buffer("k_latent", k_lat)
        V = finv(W0, F.softplus(a_lat), F.softplus(k_lat)) if init else torch.zeros_like(W0)
        ad.V = nn.Parameter(V.float())
        return W0

    def hparams(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, k) of this layer: bound and slope at zero."""
        return F.softplus(layer.adapter.a_latent), F.softplus(layer.adapter.k_latent)

    def weight(self, layer) -> torch.Tensor:
        a, k = self.hparams(layer)
        return self._fns()[0](layer.adapter.V, a, k)

    def delta(self, layer, W):
        return self.weight(layer) - W

    def forward(self, layer, x):
        return layer.functional(x, self.weight(layer).to(x.dtype))

    def trainable_count(self, out_f, in_f):
        return out_f * in_f + (2 if self.cfg.learn_hparams else 0)

    @classmethod
    def peft_factors(cls, t, cfg, W0, svd_rank):
        from ..tensor.svd import lowrank_factor

        if W0 is None or not svd_rank:
            raise ConfigError("compander replaces the whole weight: export it to PEFT with an SVD rank (--svd-rank) "
                              "and the base model, or merge it")
        f = COMPANDERS[cfg.fn][0]
        W = f(t["V"].float(), F.softplus(t["a_latent"].float()), F.softplus(t["k_latent"].float()))
        return lowrank_factor(W - W0.float(), svd_rank)
