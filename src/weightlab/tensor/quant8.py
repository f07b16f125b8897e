"""8-bit weight and activation grids as compressed-tensors (CT) computes them (W8A8 int8, FP8 e4m3).

CT's symmetric rule for every 8-bit grid: scale = max|x| / (range / 2), where range is
qmax - qmin: 255 for int8 ([-128, 127], so max|x| / 127.5) and 896 for float8_e4m3fn
([-448, 448], so max|x| / 448). Then q = clamp(round(x / scale), qmin, qmax) for int8, and
q = clamp(x / scale, -448, 448) cast to float8_e4m3fn for FP8 (the cast rounds to nearest even);
x_hat = q * scale. A zero scale (an all-zero row or token) becomes the scale dtype's eps (CT:
0.125 for fp8 scales, finfo.eps otherwise). Everything here divides in float32 as CT does for
float32 inputs: the largest |x| of an int8 group sits exactly on a half step (127.5), so the last
bit of the quotient decides its level (see tensor/quant.to_codes).

Activation scales: ``dynamic`` per token (one scale per row of the last dimension, computed at run
time) or ``static`` per tensor (one scale from the calibration set's max |x|). The KV cache is FP8
per tensor, static: k_scale / v_scale = max |k| / 448, max |v| / 448.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
INT8_HALF_RANGE = 127.5  # (127 - (-128)) / 2
KINDS = ("int", "float")


def half_range(kind: str) -> float:
    if kind not in KINDS:
        raise ValueError(f"unknown 8-bit grid type {kind!r}; one of {KINDS}")
    return INT8_HALF_RANGE if kind == "int" else FP8_MAX


def scale_from_absmax(absmax: torch.Tensor, kind: str, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CT's symmetric scale for values whose largest magnitude is ``absmax`` (any shape), in ``scale_dtype``."""
    s = (absmax.to(torch.float32) / half_range(kind)).to(scale_dtype)
    eps = 0.125 if scale_dtype == FP8 else float(torch.finfo(scale_dtype).eps)
    return torch.where(s == 0, torch.full_like(s, eps), s)


def round_to_grid(x: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """Levels of x / scale (float32 quotient): integers in [-128, 127] (int), or float8_e4m3fn values (float)."""
    q = x.to(torch.float32) / scale.to(torch.float32)
    if kind == "int":
        return torch.clamp(torch.round(q), -128, 127)
    return torch.clamp(q, -FP8_MAX, FP8_MAX).to(FP8)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """q(x) * scale in x's dtype (what CT's forward computes for a static scale)."""
    return (round_to_grid(x, scale, kind).to(torch.float32) * scale.to(torch.float32)).to(x.dtype)


def fake_quantize_tokens(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Dynamic per-token quantization (CT strategy 'token'): one scale per row of the last dimension."""
    absmax = x.detach().abs().amax(dim=-1, keepdim=True)
    return fake_quantize(x, scale_from_absmax(absmax, kind), kind)


@dataclass
class FloatQuant:
    """An (out x in) matrix as float8_e4m3fn values with one float scale per row (channel) or one in all (tensor).

    ``input_absmax``: the calibrated max |x| of the layer's input when its activations are static
    (the CT ``input_scale`` is derived from it), else None."""

    codes: torch.Tensor  # (out, in) float8_e4m3fn
    scales: torch.Tensor  # (out, 1) channel or (1, 1) tensor
    strategy: str = "channel"
    input_absmax: torch.Tensor | None = None
    bits: int = 8
    group_size: int = -1
    sym: bool = True

    def dequantize(self) -> torch.Tensor:
        return self.codes.to(torch.float32) * self.scales.to(torch.float32)


def fp8_quantize(W: torch.Tensor, strategy: str = "channel", scale_dtype: torch.dtype = torch.float32) -> FloatQuant:
    """FP8 e4m3 weights with CT's per-channel or per-tensor scale (max |w| / 448, rounded to ``scale_dtype`` first,
    so the stored scale is the one the values were divided by)."""
    if strategy not in ("channel", "tensor"):
        raise ValueError(f"FP8 weight scales are per 'channel' or per 'tensor', not {strategy!r}")
    W = W.to(torch.float32)
    absmax = W.abs().amax(dim=1, keepdim=True) if strategy == "channel" else W.abs().amax().reshape(1, 1)
    scale = scale_from_absmax(absmax, "float", scale_dtype)
    return FloatQuant(round_to_grid(W, scale, "float"), scale, strategy)


def observed_absmax(mins: list, maxs: list, observer: str = "static_minmax", constant: float = 0.01) -> torch.Tensor:
    """The max |x| a static scale is made from, from per-batch minima/maxima (float32 scalars, in batch order).

    ``static_minmax``: the extremes over all batches. ``minmax`` (llm-compressor's default observer for static
    int8 inputs and the KV cache): a moving average, the first batch as is, then m * (1 - c) + new * c with
    c = 0.01, in float32 as its lerp. Then max(|min|, |max|) with min <= 0 <= max (CT keeps 0 on the grid)."""
    lo, hi = mins[0].to(torch.float32), maxs[0].to(torch.float32)
    for a, b in zip(mins[1:], maxs[1:]):
        if observer == "static_minmax":
            lo, hi = torch.minimum(lo, a), torch.maximum(hi, b)
        elif observer == "minmax":
            lo, hi = lo * (1.0 - constant) + a * constant, hi * (1.0 - constant) + b * constant
        else:
            raise ValueError(f"unknown observer {observer!r}; static_minmax or minmax")
    return torch.maximum(lo.clamp(max=0).abs(), hi.clamp(min=0))
