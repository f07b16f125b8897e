"""LoRA (Hu et al. 2021) with the rsLoRA scaling option (Kalajdzievski 2023).

y = x W0^T + s * drop(x) A^T B^T, A (r x in) kaiming_uniform(a=sqrt(5)) or N(0, 1/r), B = 0.
s = alpha/r, or alpha/sqrt(r) with ``rslora``. Defaults are PEFT's: r=8, alpha=8, dropout 0.
Conv2d: A is a conv with the layer's kernel (r x in x kh x kw), B a 1x1 conv, as in PEFT.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import MethodConfig, Regime, register
from .layer import AdapterMethod, rank_of


class LoraConfig(MethodConfig):
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    seed: int | None = None


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


@register("adapt", "lora", kind="adapter", regime=Regime.WHOLE_MODEL, config=LoraConfig,
          paper="Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (arXiv 2106.09685); "
                "rsLoRA: Kalajdzievski 2023 (arXiv 2312.03732)",
          summary="trainable low-rank update s*B@A on frozen weights (rslora: s = alpha/sqrt(r))",
          layers="linear, conv1d, conv2d", trainable="r*(in+out)")
class LoRA(AdapterMethod):
    name = "lora"
    layer_kinds = ("linear", "conv1d", "conv2d")

    def scale(self, layer) -> float:
        return lora_scale(self.cfg.alpha, layer.adapter.lora_A.shape[0], self.cfg.rslora)

    def create(self, layer, W0, init=True):
        out_f, in_f = W0.shape
        r = rank_of(self.cfg.r, out_f, in_f)
        A = torch.zeros(r, in_f)
        if init:
            g = torch.Generator().manual_seed(self.cfg.seed) if self.cfg.seed is not None else None
            if self.cfg.init == "gaussian":
                A.normal_(0, 1 / r, generator=g)
            else:  # kaiming_uniform(a=sqrt(5)) on an (r, in) weight: U(-1/sqrt(in), 1/sqrt(in))
                bound = 1 / math.sqrt(in_f)
                A.uniform_(-bound, bound, generator=g)
        layer.adapter.lora_A = nn.Parameter(A.to(layer.base_layer.weight.dtype))
        layer.adapter.lora_B = nn.Parameter(torch.zeros(out_f, r, dtype=layer.base_layer.weight.dtype))
        layer.adapter.drop = nn.Dropout(self.cfg.dropout) if self.cfg.dropout > 0 else nn.Identity()
        return W0

    def factors(self, layer):
        return layer.adapter.lora_B, layer.adapter.lora_A

    def delta(self, layer, W):
        B, A = self.factors(layer)
        return self.scale(layer) * (B.float() @ A.float())

    def delta_forward(self, layer, x):
        B, A = self.factors(layer)
        return (layer.adapter.drop(x) @ A.t().to(x.dtype)) @ (self.scale(layer) * B.t().to(x.dtype))

    def forward(self, layer, x):
        if layer.kind == "conv2d":
            b = layer.base_layer
            A = layer.adapter.lora_A.to(x.dtype).reshape(-1, *b.weight.shape[1:])
            h = F.conv2d(layer.adapter.drop(x), A, None, b.stride, b.padding, b.dilation, b.groups)
            B = layer.adapter.lora_B.to(x.dtype)[:, :, None, None]
            return b(x) + self.scale(layer) * F.conv2d(h, B)
        return super().forward(layer, x)

    def trainable_count(self, out_f, in_f):
        return rank_of(self.cfg.r, out_f, in_f) * (out_f + in_f)

    @classmethod
    def peft_factors(cls, t, cfg, W0, svd_rank):
        s = lora_scale(cfg.alpha, t["lora_A"].shape[0], cfg.rslora)
        return s * t["lora_B"].float(), t["lora_A"].float()
