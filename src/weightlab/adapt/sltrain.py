"""SLTrain (Han et al. 2024): W = s B A + S, low-rank plus sparse with a fixed random support.

S lives on I, ``delta * out * in`` flat indices drawn uniformly without replacement (sorted,
a buffer); its values V train, as do A, B and the bias; s = alpha/r is folded into A in the
forward. The linear op is memory-lean: it saves (x, B, A, V, I), not W, and rebuilds W in
the backward (:class:`~weightlab.adapt._sparse.LowRankSparseLinear`).

Two uses:

- Training from scratch: :class:`SLTrainLinear` and :func:`convert` (replace a model's linears,
  e.g. a zoo MLP or a fresh tiny Llama; embeddings and the LM head stay dense). Init as the
  reference: A kaiming_uniform(a=sqrt(5)), B = 0, V ~ U(+-1/sqrt(in)), bias ~ U(+-1/sqrt(out)),
  so W = S at the start. :func:`densify` turns the layers into plain ``nn.Linear``.
- Fine-tuning (adapter "sltrain"): W_eff = W0 + s B A + S with W0 frozen and V = 0, B = 0 at
  the start (the output is unchanged), merging to a dense W0 + s B A + S.

Parameters r(in+out) + int(delta*out*in) (+ bias). Reference defaults (60M LLaMA): r=128,
delta=0.03, alpha=32, lr 3e-3, AdamW wd 0, warmup 10%.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from . import _sparse
from .layer import AdapterMethod, rank_of


class SLTrainConfig(MethodConfig):
    r: int = 128
    delta: float = 0.03
    alpha: float = 32.0
    seed: int = 0


def support_size(out_f: int, in_f: int, delta: float) -> int:
    return int(delta * out_f * in_f)


def _factors(out_f: int, in_f: int, r: int, delta: float, g: torch.Generator | None, dtype=torch.float32):
    A = torch.empty(r, in_f, dtype=dtype).uniform_(-1 / math.sqrt(in_f), 1 / math.sqrt(in_f), generator=g)
    I = _sparse.random_support(out_f, in_f, support_size(out_f, in_f, delta), g)
    return A, torch.zeros(out_f, r, dtype=dtype), I


class SLTrainLinear(nn.Module):
    """A linear layer whose weight is s B A + scatter(V, I), trained from scratch."""

    def __init__(self, in_features: int, out_features: int, r: int = 128, delta: float = 0.03, alpha: float = 32.0,
                 bias: bool = True, seed: int | None = None):
        super().__init__()
        if not 0 <= delta <= 1:  # 0: a pure low-rank layer (the low-rank pretraining baseline)
            raise ConfigError(f"sltrain delta must be in [0, 1], got {delta}")
        self.in_features, self.out_features = in_features, out_features
        self.r = rank_of(r, out_features, in_features)
        self.scale = alpha / self.r
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        A, B, I = _factors(out_features, in_features, self.r, delta, g)
        bound = 1 / math.sqrt(in_features)
        self.A, self.B = nn.Parameter(A), nn.Parameter(B)
        self.V = nn.Parameter(torch.empty(I.numel()).uniform_(-bound, bound, generator=g))
        self.register_buffer("index", I)
        bb = 1 / math.sqrt(out_features)  # the reference's bias bound (fan-out, not nn.Linear's fan-in)
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bb, bb, generator=g)) if bias else None

    def forward(self, x):
        return _sparse.low_rank_sparse_linear(x, self.B, self.scale * self.A, self.V, self.index, self.bias)

    def dense_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return self.scale * (self.B @ self.A) + _sparse.scatter(self.V, self.index, (self.out_features,
                                                                                         self.in_features))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"nnz={self.index.numel()}, bias={self.bias is not None}")


def convert(model: nn.Module, targets="all-linear", r: int = 128, delta: float = 0.03, alpha: float = 32.0,
            seed: int = 0) -> nn.Module:
    """Replace the target ``nn.Linear`` layers by freshly initialized SLTrain layers (pretraining); in place."""
    from .api import _set_module, select_targets

    for i, n in enumerate(select_targets(model, targets, kinds=("linear",))):
        m = model.get_submodule(n)
        if not isinstance(m, nn.Linear):
            raise ConfigError(f"sltrain pretraining replaces nn.Linear layers; '{n}' is {type(m).__name__}")
        new = SLTrainLinear(m.in_features, m.out_features, r, delta, alpha, m.bias is not None, seed=seed + i)
        _set_module(model, n, new.to(m.weight.device))
    return model


def densify(model: nn.Module) -> nn.Module:
    """Replace every SLTrain layer by an ``nn.Linear`` with the dense weight s B A + S; in place."""
    from .api import _set_module

    for n, m in [(n, m) for n, m in model.named_modules() if isinstance(m, SLTrainLinear)]:
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.A.device)
        with torch.no_grad():
            lin.weight.copy_(m.dense_weight())
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        _set_module(model, n, lin)
    return model


@register("adapt", "sltrain", kind="adapter", regime=Regime.WHOLE_MODEL, config=SLTrainConfig,
          paper="Han et al. 2024, SLTrain: a sparse plus low-rank approach for parameter and memory efficient "
                "pretraining (arXiv 2406.02214)",
          summary="W0 + s*B@A + S with S on a fixed random support; also SLTrainLinear for pretraining",
          layers="linear, conv1d", trainable="r*(in+out) + int(delta*out*in)")
class SLTrain(AdapterMethod):
    name = "sltrain"

    def scale(self, layer) -> float:
        return self.cfg.alpha / layer.adapter.lora_A.shape[0]

    def create(self, layer, W0, init=True):
        out_f, in_f = W0.shape
        r = rank_of(self.cfg.r, out_f, in_f)
        g = torch.Generator().manual_seed(self.cfg.seed + _name_seed(layer.layer_name)) if init else None
        A, B, I = _factors(out_f, in_f, r, self.cfg.delta, g)
        a = layer.adapter
        a.lora_A, a.lora_B = nn.Parameter(A), nn.Parameter(B)
        a.V = nn.Parameter(torch.zeros(I.numel()))
        a.register_buffer("index", I)
        return W0

    def delta(self, layer, W):
        a = layer.adapter
        return self.scale(layer) * (a.lora_B @ a.lora_A) + _sparse.scatter(a.V, a.index, W.shape)

    def delta_forward(self, layer, x):
        a = layer.adapter
        y = _sparse.low_rank_sparse_linear(x.to(a.lora_A.dtype), a.lora_B, self.scale(layer) * a.lora_A, a.V,
                                           a.index)
        return y.to(x.dtype)

    def trainable_count(self, out_f, in_f):
        return rank_of(self.cfg.r, out_f, in_f) * (out_f + in_f) + support_size(out_f, in_f, self.cfg.delta)

    @classmethod
    def peft_factors(cls, t, cfg, W0, svd_rank):
        if W0 is None or not svd_rank:
            raise ConfigError("sltrain is low-rank plus sparse, not LoRA-shaped: export it to PEFT with an SVD rank "
                              "(svd_rank=..., --svd-rank) and the base model")
        from ..tensor.svd import lowrank_factor

        s = cfg.alpha / t["lora_A"].shape[0]
        D = s * (t["lora_B"].float() @ t["lora_A"].float()) + _sparse.scatter(t["V"].float(), t["index"], W0.shape)
        return lowrank_factor(D, svd_rank)


def _name_seed(name: str) -> int:
    """A stable per-layer seed offset, so layers of one shape get different supports."""
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % 1_000_003


__all__ = ["SLTrain", "SLTrainConfig", "SLTrainLinear", "convert", "densify", "support_size"]
