"""Weight Compander (Cakaj, Mehnert, Yang, IJCNN 2023, arXiv 2306.16993): every weight is w = Psi(v).

The paper's function, Eq. (1), with a, b > 0:

    w = Psi(v) = a * arctan(v / b)                                           ("arctan", the default)

- odd, strictly increasing, bounded: |w| < a*pi/2 (the magnitude restriction, Sec. III-A);
- dPsi/dv = a / (b (1 + v^2/b^2)), Eq. (3): largest at v = 0 (a/b), so near-zero weights get the
  biggest updates and are pushed away from zero ("reactivating dead weights");
- init, Eq. (4): v = Psi^-1(w) = b * tan(w / a) of the layer's own init, so the network starts
  exactly at its standard initialization (needs |w| < a*pi/2);
- applied to the weights of conv and linear layers, never to biases or BatchNorm (Sec. III-A).

Two variants. Fixed (Sec. III-A, the paper's main method): one (a, b) shared by every weight of the
network; the paper grid-searches a, b in {0.5, ..., 1.0} per model (Table I) and gives no single
default, so weightlab's default is a = b = 0.7 (the median of the tuned values, WRN-28-10's choice).
Learned (Sec. III-B, ``learn_hparams=True``): a and b are parameters trained by SGD, one pair per
layer ("fine", the version the paper reports, Table VI) or one pair for the whole network ("coarse",
``share="model"``), initialized at a = 0.5, b = 1.0 (the paper's best init). They are learned directly
(no positivity reparameterization: the paper has none).

Weight decay (Sec. III-A2, III-B): with fixed (a, b) the paper decays w = Psi(v), not v; with learned
(a, b) it decays v and not a, b. :func:`param_groups` and :func:`decay_penalty` give exactly that.
With Adam the paper uses Powerpropagation's modified step (adaptive step on dL/dw, then times
dPsi/dv, Sec. III-A3): ``make_optimizer`` returns that optimizer (``adapt/compander_opt.py``).

The paper's other S-shaped functions (Sec. IV-F, Table VII) are built in too: "erf" (a*erf(v/b),
|w| < a) and "arsinh" (a*asinh(v/b), unbounded). ``COMPANDERS[name] = Compander(f, inverse, bound)``
adds one. The merged weight is Psi(V) (Sec. III-A4: after training Psi(v) is copied into a plain
network); the merge is not invertible from Psi(V) alone, the wrapper keeps the base for unfold.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from .layer import AdapterMethod


class Compander(NamedTuple):
    f: Callable[..., torch.Tensor]  # f(v, a, b) -> w
    inverse: Callable[..., torch.Tensor]  # inverse(w, a, b) -> v
    bound: Callable[[float], float]  # sup |f| for this a (inf: unbounded)


COMPANDERS: dict[str, Compander] = {
    "arctan": Compander(lambda v, a, b: a * torch.atan(v / b),  # Eq. (1)
                        lambda w, a, b: b * torch.tan(w / a),  # Eq. (4)
                        lambda a: a * math.pi / 2),
    "erf": Compander(lambda v, a, b: a * torch.erf(v / b),  # Sec. IV-F
                     lambda w, a, b: b * torch.erfinv(w / a),
                     lambda a: a),
    "arsinh": Compander(lambda v, a, b: a * torch.asinh(v / b),  # Sec. IV-F
                        lambda w, a, b: b * torch.sinh(w / a),
                        lambda a: math.inf),
}

FIXED_DEFAULT = (0.7, 0.7)  # weightlab's pick from Table I (the paper tunes a, b per model)
LEARNED_INIT = (0.5, 1.0)  # Sec. IV-E: the best initialization of the learned (fine) version


class CompanderConfig(MethodConfig):
    fn: str = "arctan"  # a key of COMPANDERS; Eq. (1) is "arctan"
    a: float | None = None  # None: 0.7 fixed, 0.5 learned
    b: float | None = None  # None: 0.7 fixed, 1.0 learned
    learn_hparams: bool = False  # Sec. III-B: learn a, b by SGD
    share: Literal["layer", "model"] = "layer"  # learned a, b per layer ("fine") or one pair ("coarse")


def _hparams(cfg: CompanderConfig) -> tuple[float, float]:
    a0, b0 = LEARNED_INIT if cfg.learn_hparams else FIXED_DEFAULT
    a = a0 if cfg.a is None else cfg.a
    b = b0 if cfg.b is None else cfg.b
    if not (a > 0 and b > 0):
        raise ConfigError(f"weight compander needs a, b > 0 (Eq. 1), got a={a:g}, b={b:g}")
    return a, b


def _compander(cfg: CompanderConfig) -> Compander:
    if cfg.fn not in COMPANDERS:
        raise ConfigError(f"unknown compander '{cfg.fn}'; known: {', '.join(sorted(COMPANDERS))}")
    return COMPANDERS[cfg.fn]


@register("adapt", "compander", kind="adapter", regime=Regime.WHOLE_MODEL, config=CompanderConfig,
          paper="Cakaj, Mehnert, Yang 2023, Weight Compander: A Simple Weight Reparameterization for "
                "Regularization (IJCNN 2023, arXiv 2306.16993)",
          summary="w = a*arctan(v/b) (Eq. 1): |w| < a*pi/2, steepest at 0 so weights leave zero; v0 = b*tan(W0/a); "
                  "a, b fixed or learned per layer",
          layers="linear, conv1d, conv2d", trainable="out*in (+ 2 per layer when learned)")
class WeightCompander(AdapterMethod):
    name = "compander"
    layer_kinds = ("linear", "conv1d", "conv2d")
    materialize = True
    invertible = False

    @classmethod
    def prepare(cls, model, names, cfg):
        """The coarse learned version: one (a, b) pair for every layer. The Parameters are registered
        (trained, saved) on the first layer only; the others read them from here (safetensors refuses
        a tensor saved under two names)."""
        if not (cfg.learn_hparams and cfg.share == "model"):
            return None
        a, b = _hparams(cfg)
        return {"a": nn.Parameter(torch.tensor(a)), "b": nn.Parameter(torch.tensor(b)), "owner": None}

    def create(self, layer, W0, init=True):
        comp = _compander(self.cfg)
        a, b = _hparams(self.cfg)
        limit = comp.bound(a)
        if init and float(W0.abs().max()) >= limit:
            raise ConfigError(f"compander bound {limit:g} (a={a:g}) must exceed max|W| = {float(W0.abs().max()):g} "
                              f"of '{layer.layer_name}': Eq. (4) cannot invert it (raise a)")
        ad = layer.adapter
        if self.shared is not None:
            if self.shared["owner"] in (None, layer.layer_name):
                self.shared["owner"] = layer.layer_name
                ad.a, ad.b = self.shared["a"], self.shared["b"]
        elif self.cfg.learn_hparams:
            ad.a, ad.b = nn.Parameter(torch.tensor(a)), nn.Parameter(torch.tensor(b))
        else:
            ad.register_buffer("a", torch.tensor(a))
            ad.register_buffer("b", torch.tensor(b))
        V = comp.inverse(W0.double(), a, b) if init else torch.zeros_like(W0)  # Eq. (4), float64: no drift
        ad.V = nn.Parameter(V.float())
        ad.V._wc_slope = _slope_fn(ad, comp, self)  # read by CompanderAdamW (the paper's modified Adam step)
        return W0

    def hparams(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of this layer."""
        return self._ab(layer.adapter)

    def _ab(self, ad: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shared is not None:
            return self.shared["a"], self.shared["b"]
        return ad.a, ad.b

    def weight(self, layer) -> torch.Tensor:
        """Psi(V) in (out, in) layout, float32."""
        a, b = self.hparams(layer)
        return _compander(self.cfg).f(layer.adapter.V, a, b)

    def delta(self, layer, W):
        return self.weight(layer) - W

    def forward(self, layer, x):
        return layer.functional(x, self.weight(layer).to(x.dtype))

    def trainable_count(self, out_f, in_f):
        return out_f * in_f + (2 if self.cfg.learn_hparams and self.cfg.share == "layer" else 0)

    @staticmethod
    def make_optimizer(params, lr, cfg, weight_decay=0.0):
        from .compander_opt import CompanderAdamW

        return CompanderAdamW(params, lr=lr, weight_decay=weight_decay)

    @classmethod
    def peft_factors(cls, t, cfg, W0, svd_rank):
        from ..tensor.svd import lowrank_factor

        if W0 is None or not svd_rank:
            raise ConfigError("compander replaces the whole weight: export it to PEFT with an SVD rank (--svd-rank) "
                              "and the base model, or merge it")
        if "a" not in t:
            raise ConfigError("a compander with one learned (a, b) for the whole model (share='model') keeps the "
                              "pair on its first layer only: fold it, then export the folded model")
        W = COMPANDERS[cfg.fn].f(t["V"].float(), t["a"].float(), t["b"].float())
        return lowrank_factor(W - W0.float(), svd_rank)


def _slope_fn(ad: nn.Module, comp: Compander, meth: WeightCompander) -> Callable[[], tuple[torch.Tensor, ...]]:
    """() -> (Psi(V), dPsi/dV) of this adapter, without graph (dPsi/dV is Eq. 3 for arctan)."""
    def slope() -> tuple[torch.Tensor, torch.Tensor]:
        a, b = meth._ab(ad)
        with torch.enable_grad():
            V = ad.V.detach().requires_grad_(True)
            w = comp.f(V, a.detach(), b.detach())
            (s,) = torch.autograd.grad(w.sum(), V)
        return w.detach(), s
    return slope


def _compander_layers(model: nn.Module):
    from .named import adapter_layers

    for lay in adapter_layers(model).values():
        for a in lay.active:
            if a not in lay.merged_names and isinstance(lay.methods[a], WeightCompander):
                yield a, lay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups with the paper's weight decay (Sec. III-A2, III-B).

    Fixed (a, b): V gets no decay here (:func:`decay_penalty` decays Psi(V) instead). Learned (a, b):
    V is decayed, a and b are not. Every other trainable parameter (biases, BatchNorm) is decayed as usual.
    """
    no_decay: dict[int, nn.Parameter] = {}
    for a, lay in _compander_layers(model):
        ad = lay.adapter_module(a)
        for t in lay.methods[a]._ab(ad):
            if isinstance(t, nn.Parameter):
                no_decay[id(t)] = t
        if not lay.methods[a].cfg.learn_hparams:
            no_decay[id(ad.V)] = ad.V
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in no_decay]
    return [{"params": rest, "weight_decay": weight_decay},
            {"params": [p for p in no_decay.values() if p.requires_grad], "weight_decay": 0.0}]


def decay_penalty(model: nn.Module, weight_decay: float) -> torch.Tensor:
    """weight_decay/2 * sum ||Psi(V)||^2 over the fixed-(a, b) compander layers: its gradient w.r.t. w is
    weight_decay * w, what SGD's weight_decay adds for a plain weight (Eq. 5 applied to w = Psi(v))."""
    total = torch.zeros(())
    for a, lay in _compander_layers(model):
        meth = lay.methods[a]
        if not meth.cfg.learn_hparams:
            with lay.using(a):
                total = total + meth.weight(lay).square().sum()
    return 0.5 * weight_decay * total
