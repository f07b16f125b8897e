"""Round-to-nearest integer grids (GPTQ's min-max quantizer): per channel or per group, sym/asym, 2-8 bits.

A weight matrix W (out x in) is cut into column groups of ``group_size`` consecutive inputs
(``group_size <= 0``: one group = the whole row; a last partial group is allowed, so widths
such as 576 work with group 128). Each (row, group) has its own scale and integer zero point:

    xmin = min(min w, 0), xmax = max(max w, 0)            (0 always representable)
    symmetric: xmax = max(|xmin|, xmax), xmin = -xmax, zero = 2^(b-1)
    scale = (xmax - xmin) / (2^b - 1), zero = round(-xmin / scale)  (asymmetric)
    code = clamp(round(w / scale) + zero, 0, 2^b - 1),  w_hat = scale * (code - zero)

Rows with min = max = 0 use [-1, 1]. Scales are rounded to their storage dtype (float16 by
default) when they are found, so the dequantized weights computed here are bit-identical to
what the packed format (compress/packed.py) loads back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def check_bits(bits: int, lo: int = 2, hi: int = 8) -> int:
    if not isinstance(bits, int) or not lo <= bits <= hi:
        raise ValueError(f"bits must be an integer in [{lo}, {hi}], got {bits!r}")
    return bits


def num_groups(cols: int, group_size: int) -> int:
    return 1 if group_size <= 0 else -(-cols // group_size)


def group_index(cols: int, group_size: int, device=None) -> torch.Tensor:
    """Group of every input column (the trailing group may be partial)."""
    if group_size <= 0:
        return torch.zeros(cols, dtype=torch.long, device=device)
    return torch.arange(cols, device=device) // group_size


def _store(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    dt = SCALE_DTYPES[scale_dtype]
    tiny = float(torch.finfo(dt).tiny) if dt != torch.float32 else 1e-30
    return scale.clamp_min(tiny).to(dt).to(scale.dtype)


def find_params(w: torch.Tensor, bits: int, sym: bool = False, scale_dtype: str = "float16"):
    """(scale, zero) per row of ``w`` (rows x cols), shapes (rows,); zero is an integer-valued float."""
    maxq = 2 ** bits - 1
    xmin = torch.clamp(w.min(dim=1).values, max=0)
    xmax = torch.clamp(w.max(dim=1).values, min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, torch.full_like(xmin, -1), xmin)
    xmax = torch.where(dead, torch.full_like(xmax, 1), xmax)
    scale = _store((xmax - xmin) / maxq, scale_dtype)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero


def to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
             quotient_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Integer codes in [0, 2^b - 1]; scale/zero broadcast against w.

    ``quotient_dtype``: divide w / scale in this dtype (compressed-tensors divides float32 weights in
    float32). It matters at exact half steps, where the largest |w| of every symmetric group sits
    (|w| / scale = 2^(b-1) - 1/2): the last bit of the quotient picks the level there.
    """
    q = w / scale if quotient_dtype is None else (w.to(quotient_dtype) / scale.to(quotient_dtype)).to(w.dtype)
    return torch.clamp(torch.round(q) + zero, 0, 2 ** bits - 1)


def dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return dequant(to_codes(w, scale, zero, bits), scale, zero)


@dataclass
class AffineQuant:
    """An (out x in) matrix as integer codes with per-(row, group) scales and zero points.

    ``g_idx[j]`` is the group of input column j (act-order GPTQ may permute it); the
    dequantized matrix is ``scales[:, g_idx] * (codes - zeros[:, g_idx])`` in float32.
    """

    codes: torch.Tensor  # (out, in) uint8
    scales: torch.Tensor  # (out, groups) in scale_dtype
    zeros: torch.Tensor  # (out, groups) uint8
    g_idx: torch.Tensor  # (in,) int32
    bits: int
    group_size: int
    sym: bool = False
    input_absmax: torch.Tensor | None = None  # calibrated max |x| of the layer's input (static W8A8 activations)

    def dequantize(self, rows: int = 256) -> torch.Tensor:
        # row chunks: the gathered scales, zeros and float codes of the whole matrix would be three more
        # (out x in) float32 copies at the peak of a large layer; the values are the same elementwise ops
        # one group (per channel): every g_idx is 0, so broadcasting the (out, 1) column is the same product
        # without gathering it to (rows, in) twice
        g = self.g_idx.long() if self.scales.shape[1] > 1 else slice(None)
        out = torch.empty(self.codes.shape, dtype=torch.float32, device=self.codes.device)
        for r in range(0, self.codes.shape[0], rows):
            sl = slice(r, r + rows)
            out[sl] = self.scales[sl].float()[:, g] * (self.codes[sl].float() - self.zeros[sl].float()[:, g])
        return out

    @property
    def trivial_g_idx(self) -> bool:
        return torch.equal(self.g_idx.long(), group_index(self.codes.shape[1], self.group_size, self.g_idx.device))


def float32_groups_apply(W: torch.Tensor, group_size: int, quotient_dtype: torch.dtype | None) -> bool:
    """Whether ``rtn_float32_groups`` gives rtn's result for these arguments."""
    return (quotient_dtype == torch.float32 and W.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and W.dim() == 2 and W.numel() > 0 and (group_size <= 0 or W.shape[1] % group_size == 0))


def rtn_float32_groups(W: torch.Tensor, bits: int, group_size: int, sym: bool, scale_dtype: str):
    """``rtn(W, ..., quotient_dtype=float32)`` without float64 copies of W, for float32/16 weights whose width
    is a multiple of the group: (codes, scales, zeros) as float32, one row per (row, group); scales hold
    values of ``scale_dtype``.

    Why identical: a group's min and max are exact in any dtype, so find_params gets rtn's float64 inputs
    (on a (row-groups, 2) matrix of them: the per-group arithmetic is rtn's own); the quotient is float32 in
    both; round, + zero point and clamp of a float32 quotient are exact integer steps in float32 as in
    float64. AWQ's grid search (20 quantizations per mapping) and SmoothQuant's W8A8 spent ~10 % of their
    calls in rtn's float64 elementwise work on SmolLM2-135M."""
    g = W.to(torch.float32).reshape(-1, W.shape[1] if group_size <= 0 else group_size)
    s, z = find_params(torch.stack([g.amin(dim=1), g.amax(dim=1)], dim=1).double(), bits, sym, scale_dtype)
    s, z = s.float()[:, None], z.float()[:, None]
    return to_codes(g, s, z, bits, torch.float32), s, z


def rtn(W: torch.Tensor, bits: int = 4, group_size: int = -1, sym: bool = False,
        scale_dtype: str = "float16", quotient_dtype: torch.dtype | None = None) -> AffineQuant:
    """Round-to-nearest quantization of W (out x in); ``quotient_dtype``: see ``to_codes``."""
    check_bits(bits)
    if float32_groups_apply(W, group_size, quotient_dtype):
        rows, cols = W.shape
        codes, s, z = rtn_float32_groups(W, bits, group_size, sym, scale_dtype)
        G = num_groups(cols, group_size)
        return AffineQuant(codes.reshape(rows, cols).to(torch.uint8), s.reshape(rows, G).to(SCALE_DTYPES[scale_dtype]),
                           z.reshape(rows, G).to(torch.uint8), group_index(cols, group_size, W.device).to(torch.int32),
                           bits, group_size, sym)
    W = W.double()  # the same arithmetic as GPTQ's loop, so GPTQ with H = I is bit-identical
    rows, cols = W.shape
    g_idx = group_index(cols, group_size, W.device)
    G = num_groups(cols, group_size)
    scales = torch.empty(rows, G, dtype=torch.float64, device=W.device)
    zeros = torch.empty(rows, G, dtype=torch.float64, device=W.device)
    codes = torch.empty(rows, cols, dtype=torch.float64, device=W.device)
    for g in range(G):
        sl = slice(0, cols) if group_size <= 0 else slice(g * group_size, min((g + 1) * group_size, cols))
        s, z = find_params(W[:, sl], bits, sym, scale_dtype)
        scales[:, g], zeros[:, g] = s, z
        codes[:, sl] = to_codes(W[:, sl], s[:, None], z[:, None], bits, quotient_dtype)
    return AffineQuant(codes.to(torch.uint8), scales.to(SCALE_DTYPES[scale_dtype]), zeros.to(torch.uint8),
                       g_idx.to(torch.int32), bits, group_size, sym)
