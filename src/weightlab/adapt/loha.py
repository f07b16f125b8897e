"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS): a Hadamard product of two low-rank updates, PEFT's ``LOHA``.

dW = s * (W1a W1b) o (W2a W2b), W1a, W2a (out x r), W1b, W2b (r x in), s = alpha / r; the effective rank
is up to r^2 for 2 r (out + in) parameters. PEFT's init: W1a, W1b, W2a kaiming-uniform(a=sqrt(5)),
W2b = 0 (so dW = 0 at init); defaults r=8, alpha=8. Conv2d: the update of the flattened (out, in*kh*kw)
weight (PEFT without ``use_effective_conv2d``). The forward is PEFT's, base(x) + x dW^T with dW built
in the parameters' dtype. ``fold`` adds dW (W-independent: ``unfold`` subtracts it).

Tensors carry PEFT's names (``hada_w1_a`` ...), so a PEFT LOHA folder is the same tensors under
``base_model.model.<name>.``. Not supported (PEFT options): ``rank_dropout`` and ``module_dropout``
(training-only: an imported adapter computes the same function without them), ``use_effective_conv2d``
(the CP-decomposed ``hada_t1``/``hada_t2`` for kernels), HF Conv1D (PEFT has no LoHa for it either).
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from .layer import AdapterMethod


class LohaConfig(MethodConfig):
    r: int = 8
    alpha: float = 8.0
    seed: int | None = None


def kaiming(shape, g) -> torch.Tensor:
    """nn.init.kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = prod(shape[1:])."""
    t = torch.empty(shape)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)
    return t


class LycorisMethod(AdapterMethod):
    """Shared by LoHa and LoKr: a materialized update dW (out, in[*kh*kw]) added to the base output, as PEFT."""

    layer_kinds = ("linear", "conv2d")
    param_names: tuple[str, ...] = ()

    def scale(self) -> float:
        return self.cfg.alpha / self.cfg.r

    def generator(self):
        return torch.Generator().manual_seed(self.cfg.seed) if self.cfg.seed is not None else None

    def put(self, layer, tensors: dict[str, torch.Tensor]) -> None:
        dt = layer.base_layer.weight.dtype
        for k, v in tensors.items():
            setattr(layer.adapter, k, nn.Parameter(v.to(dt)))

    def build(self, layer, dtype) -> torch.Tensor:
        raise NotImplementedError

    def delta(self, layer, W):
        return self.build(layer, torch.float32).reshape(W.shape)

    def forward(self, layer, x):
        b = layer.base_layer
        dW = self.build(layer, None)
        y = b(x)
        xi = x.to(dW.dtype)
        if layer.kind == "conv2d":
            d = F.conv2d(xi, dW.reshape(b.weight.shape), None, b.stride, b.padding, b.dilation, b.groups)
        else:
            d = F.linear(xi, dW.reshape(b.weight.shape))
        return (y + d).to(x.dtype)

    def trainable_count(self, out_f, in_f):
        return 0  # per layer it depends on the factorization; count_trainable counts the tensors

    # -- PEFT folders -----------------------------------------------------------------------
    @classmethod
    def peft_export(cls, cfg, per_layer, shared=None):
        sd = {f"base_model.model.{n}.{k}": v.contiguous() for n, _, t, _, _ in per_layer for k, v in t.items()}
        conf = {"peft_type": cls.peft_type, "r": cfg.r, "alpha": cfg.alpha, "rank_dropout": 0.0,
                "module_dropout": 0.0, "use_effective_conv2d": False, "init_weights": True,
                "target_modules": sorted(n for n, *_ in per_layer), "rank_pattern": {}, "alpha_pattern": {},
                "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
                "exclude_modules": None, **cls.peft_conf(cfg)}
        return sd, conf

    @classmethod
    def peft_conf(cls, cfg) -> dict:
        return {}

    @classmethod
    def import_config(cls, conf) -> dict:
        return {}

    @classmethod
    def peft_import(cls, model, conf, sd, attach_exact):
        names = "|".join(cls.param_names)
        rx = re.compile(rf"^(?:base_model\.model\.)?(.+)\.({names})(?:\.[^.]+)?(?:\.weight)?$")
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in sd.items():
            if m := rx.match(k):
                layers.setdefault(m.group(1), {})[m.group(2)] = v
            elif re.search(r"\.(hada_t[12]|lokr_t2)(\.|$)", k):
                raise ConfigError(f"PEFT {conf['peft_type']} with use_effective_conv2d (key {k}) is not supported")
        if not layers:
            raise ConfigError(f"the PEFT {conf['peft_type']} adapter holds no {'/'.join(cls.param_names)} tensors")
        rp, ap = conf.get("rank_pattern") or {}, conf.get("alpha_pattern") or {}

        def pick(pat, n, default):
            return next((v for key, v in pat.items() if n == key or n.endswith("." + key)
                         or re.fullmatch(key, n)), default)

        groups: dict[tuple[int, float], list[str]] = {}
        for n in layers:
            groups.setdefault((int(pick(rp, n, conf["r"])), float(pick(ap, n, conf["alpha"]))), []).append(n)
        for (r, alpha), names_ in groups.items():
            wrapped = attach_exact(model, cls.name, names_, r=r, alpha=alpha, **cls.import_config(conf))
        with torch.no_grad():
            for n, t in layers.items():
                a = wrapped[n].adapter
                mine = {k for k, _ in a.named_parameters()}
                if mine != set(t):
                    raise ConfigError(f"PEFT {conf['peft_type']} layer {n}: tensors {sorted(t)}, "
                                      f"expected {sorted(mine)}")
                for k, v in t.items():
                    getattr(a, k).copy_(v.reshape(getattr(a, k).shape))
        return model


@register("adapt", "loha", kind="adapter", regime=Regime.WHOLE_MODEL, config=LohaConfig,
          paper="Hyeon-Woo et al. 2022, FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated "
                "Learning (arXiv 2108.06098); LyCORIS LoHa as PEFT's LOHA",
          summary="Hadamard product of two rank-r updates, s * (W1a W1b) o (W2a W2b) (PEFT LoHa)",
          layers="linear, conv2d", trainable="2*r*(in+out)")
class LoHa(LycorisMethod):
    name = "loha"
    peft_type = "LOHA"
    param_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def create(self, layer, W0, init=True):
        out_f, in_f = W0.shape
        r, g = self.cfg.r, self.generator()
        t = {"hada_w1_a": kaiming((out_f, r), g), "hada_w1_b": kaiming((r, in_f), g),
             "hada_w2_a": kaiming((out_f, r), g), "hada_w2_b": torch.zeros(r, in_f)}
        self.put(layer, t if init else {k: torch.zeros_like(v) for k, v in t.items()})
        return W0

    def build(self, layer, dtype):
        a = layer.adapter
        w1a, w1b, w2a, w2b = (getattr(a, k) if dtype is None else getattr(a, k).to(dtype) for k in self.param_names)
        return ((w1a @ w1b) * (w2a @ w2b)) * self.scale()
