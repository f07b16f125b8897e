"""StatsQ and confidence-guided annealing (CGA) from OFQ (Liu et al., "Oscillation-free Quantization
for Low-bit Vision Transformers", ICML 2023; ref nbasyl/OFQ).

StatsQ, per output row, b bits: s = 2 mean|W_row| (statistical, no learnable scale),
u = clamp(W / s, -1, 1 - 1e-6), n = 2^(b-1), Q = s (round(u n - 1/2) + 1/2) / n: 2^b
half-integer levels and no zero level, with a straight-through (identity) gradient.

CGA: after QAT, a weight is *low-confidence* iff b = u n - 1/2 lies within BR of a rounding
boundary (|frac(b) - 1/2| <= BR); only those keep learning. All others get a zero gradient
and are restored after the optimizer step (undoing weight decay and momentum):
BR = 0 freezes everything, BR = 0.5 nothing
(except saturated weights, |W/s| beyond the clamp, which are treated as confident).

As a post-training quantizer (``quantize(model, "statsq", bits)``) it is data-free and puts each
weight on the StatsQ grid (the QAT starting point). ``prepare_statsq_qat`` adds the fake
quantizer to a model's layers for training; ``CGA`` does the freezing. The rest of OFQ: query-key
reparameterization in ``qkr.py``, the LSQ baseline (learnable scale) in ``lsq.py``, the oscillation
measure in ``oscillation.py``; benchmarks/fidelity_ofq.py puts them together.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..engine.calibration import prunable_layers
from ..registry import MethodConfig, Regime, register
from ..tensor.quant import SCALE_DTYPES
from .packed import StatsQuant
from .quantize import QUANT_KIND, QuantContext


def statsq_scale(W: torch.Tensor) -> torch.Tensor:
    return 2 * W.detach().abs().mean(dim=1, keepdim=True).clamp_min(1e-12)


def statsq_levels(W: torch.Tensor, bits: int, s: torch.Tensor | None = None) -> torch.Tensor:
    """Integer level index k in [-n, n-1] of every weight (value s (k + 1/2) / n)."""
    s = statsq_scale(W) if s is None else s
    n = 2 ** (bits - 1)
    u = torch.clamp(W.detach() / s, -1, 1 - 1e-6)
    return torch.clamp(torch.round(u * n - 0.5), -n, n - 1)


def statsq_fake(W: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantized W with an identity (straight-through) gradient."""
    s = statsq_scale(W)
    n = 2 ** (bits - 1)
    Q = s * (statsq_levels(W, bits, s) + 0.5) / n
    return Q + (W - W.detach())  # value exactly Q, gradient identity


class StatsQParam(nn.Module):
    """Parametrization: module.weight reads as statsq_fake(original) (rows = dim 0)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, W):
        return statsq_fake(W.reshape(W.shape[0], -1), self.bits).reshape(W.shape)


def prepare_statsq_qat(model: nn.Module, bits: int = 2, layer_filter=None) -> dict[str, nn.Module]:
    """Put the StatsQ fake quantizer on every Linear/Conv (filtered); returns them by name."""
    layers = {n: m for n, m in prunable_layers(model).items() if layer_filter is None or layer_filter(n)}
    for m in layers.values():
        parametrize.register_parametrization(m, "weight", StatsQParam(bits))
    return layers


def low_confidence(W: torch.Tensor, bits: int, br: float = 0.005) -> torch.Tensor:
    """True where b = u n - 1/2 is within ``br`` of a rounding boundary (those weights keep training)."""
    W2 = W.detach().reshape(W.shape[0], -1)
    n = 2 ** (bits - 1)
    u = W2 / statsq_scale(W2)
    b = u * n - 0.5
    frac = b - torch.floor(b)
    inside = (u > -1) & (u < 1 - 1e-6)  # saturated (clamped) weights sit on no rounding boundary: confident
    return (((frac - 0.5).abs() <= br) & inside).reshape(W.shape)


class EntryFreezer:
    """Keep chosen entries of parameters bit-identical through optimizer steps.

    Call ``before_step()`` after backward (zeroes the frozen entries' gradients and remembers
    their values) and ``after_step()`` after ``optimizer.step()`` (restores them).
    """

    def __init__(self, params: list[nn.Parameter], mask_fn):
        self.params = params
        self.mask_fn = mask_fn  # param -> bool mask of FROZEN entries
        self._saved: list = []

    def before_step(self) -> float:
        self._saved = []
        frozen_total = total = 0
        for p in self.params:
            m = self.mask_fn(p)
            if p.grad is not None:
                p.grad.masked_fill_(m, 0)
            self._saved.append((m, p.detach()[m].clone()))
            frozen_total += int(m.sum())
            total += m.numel()
        return frozen_total / max(total, 1)

    def after_step(self) -> None:
        with torch.no_grad():
            for p, (m, v) in zip(self.params, self._saved):
                p[m] = v


class CGA(EntryFreezer):
    """Confidence-guided annealing on parametrized (StatsQ) layers or plain parameters."""

    def __init__(self, modules_or_params, bits: int, br: float = 0.005):
        params = []
        for x in modules_or_params:
            if isinstance(x, nn.Module):
                x = x.parametrizations.weight.original if parametrize.is_parametrized(x, "weight") else x.weight
            params.append(x)
        super().__init__(params, lambda p: ~low_confidence(p, bits, br))
        self.bits, self.br = bits, br


class StatsQConfig(MethodConfig):
    pass


@register("compress", "statsq", kind=QUANT_KIND, config=StatsQConfig, regime=Regime.STREAMING,
          paper="Oscillation-free Quantization for Low-bit Vision Transformers (Liu et al., ICML 2023)",
          summary="StatsQ: per-row scale 2 mean|W|, 2^b half-integer levels (no zero), STE + CGA for QAT",
          zero_level=False, default_bits=4, needs=())
def statsq(ctx: QuantContext):
    W = ctx.weight
    s = statsq_scale(W).to(SCALE_DTYPES[ctx.scale_dtype]).float()
    k = statsq_levels(W, ctx.bits, s)
    return StatsQuant((k + 2 ** (ctx.bits - 1)).to(torch.uint8), s[:, 0].to(SCALE_DTYPES[ctx.scale_dtype]), ctx.bits)
