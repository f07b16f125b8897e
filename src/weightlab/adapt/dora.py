"""DoRA (Liu et al. 2024): weight-decomposed low-rank adaptation, with PEFT's ``use_dora`` semantics.

W' = m * V / ||V||_c with V = W0 + s B A: a LoRA update V on the frozen base, then every output
row (a column of the paper's (in, out) W) rescaled to the trainable length m. ``||.||_c`` is the
norm over the input dimension of the (out, in) weight (Conv2d: over in x kh x kw of each output
channel), as PEFT's ``weight_norm``. A and B start as LoRA's (A kaiming-uniform or N(0, 1/r),
B = 0) and m = ||W0||_c, so the layer's output is unchanged at init. s = alpha/r, or alpha/sqrt(r)
with ``rslora``; defaults are PEFT's (r=8, alpha=8, dropout 0). Trainable: A, B, m.

Gradient: as PEFT (and the paper's section 4.3) the norm ||V||_c is a constant for backprop,
computed without gradient from the current A, B; m gets sum(g * xV^T)/||V|| and A, B the LoRA
gradient scaled by m/||V||. The forward is PEFT's:
y = base(x) + (m/n - 1) * x W0^T + (m/n) * s * drop(x) A^T B^T; with dropout active in training the
middle term also reads drop(x) (PEFT's choice: then dropout acts on the adapter's whole contribution).
``fold`` writes W' (float32, one rounding to the weight's dtype). W0 cannot be read back from W'
alone (each row keeps only its direction), so ``fold(unload=False)`` keeps a copy and ``unfold``
restores W0 bit for bit. PEFT interop (``peft_io``): exported as ``lora_A``, ``lora_B`` and
``lora_magnitude_vector`` with ``use_dora: true``; PEFT's own DoRA folders import as this method.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from .layer import rank_of
from .lora import LoRA


class DoraConfig(MethodConfig):
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    seed: int | None = None


@register("adapt", "dora", kind="adapter", regime=Regime.WHOLE_MODEL, config=DoraConfig,
          paper="Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation (arXiv 2402.09353); "
                "PEFT's use_dora semantics (norm detached from the gradient)",
          summary="LoRA update, then each output row rescaled to a trainable magnitude m (PEFT use_dora)",
          layers="linear, conv1d, conv2d", trainable="r*(in+out) + out")
class DoRA(LoRA):
    name = "dora"
    layer_kinds = ("linear", "conv1d", "conv2d")
    invertible = False  # W0 is not a function of W' alone: fold(unload=False) keeps a copy to undo it

    def create(self, layer, W0, init=True):
        W0 = super().create(layer, W0, init)
        dt = layer.base_layer.weight.dtype
        # from the layer's own weight (W0 above is float32 even for a float64 model): m/||W0||_c is then exactly 1
        m = self.weight_norm(layer, layer.weight_2d()) if init else torch.zeros(W0.shape[0])
        layer.adapter.magnitude = nn.Parameter(m.to(dt))
        return W0

    def weight_norm(self, layer, W: torch.Tensor) -> torch.Tensor:
        """||W + s B A||_c per output row, outside the autograd graph (PEFT, paper section 4.3).

        In float32, or float64 for a float64 layer (PEFT computes it in the activations' dtype)."""
        dt = torch.promote_types(W.dtype, torch.float32)
        with torch.no_grad():
            B, A = self.factors(layer)
            V = W.to(dt) + self.scale(layer) * (B.to(W.device, dt) @ A.to(W.device, dt))  # (create: A, B on cpu)
            return torch.linalg.vector_norm(V, dim=1)

    def delta(self, layer, W):
        B, A = self.factors(layer)
        V = W.float() + self.scale(layer) * (B.float() @ A.float())
        n = torch.linalg.vector_norm(V.detach(), dim=1)
        return (layer.adapter.magnitude.float() / n)[:, None] * V - W.float()

    def forward(self, layer, x):
        a, base = layer.adapter, layer.base_layer
        W = layer.weight_2d()
        mag = (a.magnitude / self.weight_norm(layer, W).to(a.magnitude.dtype)).to(x.dtype)
        B, A = self.factors(layer)
        result = base(x)
        conv = layer.kind == "conv2d"
        if isinstance(a.drop, nn.Identity) or not layer.training:
            xd = x
            base_out = result
            if base.bias is not None:
                base_out = result - (base.bias.view(1, -1, 1, 1) if conv else base.bias).to(x.dtype)
        else:  # as PEFT: the base term of the update is recomputed on the dropped input
            xd = a.drop(x)
            base_out = (F.conv2d(xd, base.weight.to(x.dtype), None, base.stride, base.padding, base.dilation,
                                 base.groups) if conv else F.linear(xd, W.to(x.dtype)))
        if conv:
            h = F.conv2d(xd, A.to(x.dtype).reshape(-1, *base.weight.shape[1:]), None, base.stride, base.padding,
                         base.dilation, base.groups)
            upd = F.conv2d(h, B.to(x.dtype)[:, :, None, None])
            mag = mag.view(1, -1, 1, 1)
        else:
            upd = (xd @ A.t().to(x.dtype)) @ B.t().to(x.dtype)
        return result + ((mag - 1) * base_out + mag * upd * self.scale(layer))  # PEFT's order of the sums

    def unmerge(self, layer, Wm):
        raise ConfigError("a folded DoRA weight does not determine W0 (each row keeps only its direction); "
                          "fold with unload=False keeps a copy to undo it, else detach or reload the base")

    def trainable_count(self, out_f, in_f):
        return rank_of(self.cfg.r, out_f, in_f) * (out_f + in_f) + out_f
