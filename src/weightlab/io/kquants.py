"""Q4_K and Q6_K block packing for GGUF (gguf-py can only dequantize K-quants).

Written from the block layouts (ggml-common.h, as described in docs/design.md); correctness is
checked by gguf.quants.dequantize reading our bytes back to exactly our own reconstruction.
The scale search is simpler than llama.cpp's (min/max per sub-block plus one least-squares
refit instead of make_qkx2_quants' grid search), so files are valid and close in error but not
byte-identical to llama-quantize's.

Q4_K, 144 bytes per 256 weights: f16 d, f16 dmin, 12 bytes of 6-bit (scale, min) pairs for 8
sub-blocks of 32, 128 bytes of 4-bit codes. w = d*sc*q - dmin*m.
Q6_K, 210 bytes per 256 weights: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8
scales (sub-blocks of 16), f16 d. w = d*sc*(q - 32).
"""
from __future__ import annotations

import numpy as np

QK_K = 256


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _blocks(arr: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.shape[-1] % QK_K:
        raise ValueError(f"K-quants need rows that are a multiple of {QK_K}; got {arr.shape[-1]}")
    return arr.reshape(-1, QK_K), arr.shape


def q4_k_codes(arr: np.ndarray):
    """(d, dmin, sc, m, q): the Q4_K parameters of every 256-block, before byte packing."""
    x, _ = _blocks(arr)
    n = x.shape[0]
    xs = x.reshape(n, 8, 32)
    lo = np.minimum(xs.min(axis=-1), 0.0)  # ggml keeps min <= 0 so that m >= 0
    hi = xs.max(axis=-1)
    scale = (hi - lo) / 15.0
    minv = -lo
    # one least-squares refit of (scale, min) for the codes the min/max grid gives
    q = np.clip(np.rint((xs - lo[..., None]) / np.where(scale > 0, scale, 1)[..., None]), 0, 15)
    qm, xm = q.mean(-1), xs.mean(-1)
    var = ((q - qm[..., None]) ** 2).sum(-1)
    fit = np.where(var > 0, ((q - qm[..., None]) * (xs - xm[..., None])).sum(-1) / np.where(var > 0, var, 1), scale)
    fit_min = fit * qm - xm  # x ~ fit*q - fit_min
    ok = (fit > 0) & (fit_min >= 0)
    scale = np.where(ok, fit, scale)
    minv = np.where(ok, fit_min, minv)

    d = _f16(scale.max(-1) / 63.0)
    dmin = _f16(minv.max(-1) / 63.0)
    sc = np.clip(np.rint(scale / np.where(d > 0, d, 1)[:, None]), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(minv / np.where(dmin > 0, dmin, 1)[:, None]), 0, 63).astype(np.uint8)
    eff = d[:, None] * sc  # the scale and min the file will really hold
    off = dmin[:, None] * m
    q = np.clip(np.rint((xs + off[..., None]) / np.where(eff > 0, eff, 1)[..., None]), 0, 15).astype(np.uint8)
    q = np.where(eff[..., None] > 0, q, 0).astype(np.uint8)
    return d, dmin, sc, m, q


def q4_k_dequant(d, dmin, sc, m, q) -> np.ndarray:
    """Our own reconstruction (fp32), the reference gguf's dequantizer must reproduce."""
    w = (d[:, None] * sc.astype(np.float32))[..., None] * q.astype(np.float32) \
        - (dmin[:, None] * m.astype(np.float32))[..., None]
    return w.reshape(-1, QK_K)


def pack_q4_k(d, dmin, sc, m, q) -> np.ndarray:
    n = d.shape[0]
    s = np.zeros((n, 12), dtype=np.uint8)
    # bytes 0-3: low 6 bits scale j, top 2 bits = high bits of scale j+4; bytes 4-7 the same for mins;
    # bytes 8-11: low nibble scale j+4, high nibble min j+4
    s[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    s[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    # codes: 4 chunks of 32 bytes; chunk c holds sub-block 2c in low nibbles, 2c+1 in high
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(n, 128)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(n, 2),
                           dmin.astype(np.float16).view(np.uint8).reshape(n, 2), s, qs], axis=1)


def q6_k_codes(arr: np.ndarray):
    """(d, sc, q): Q6_K parameters; q in -32..31, sc int8 per sub-block of 16."""
    x, _ = _blocks(arr)
    n = x.shape[0]
    xs = x.reshape(n, 16, 16)
    idx = np.abs(xs).argmax(-1)
    peak = np.take_along_axis(xs, idx[..., None], -1)[..., 0]
    scale = peak / -32.0  # the largest magnitude maps to -32, using the full asymmetric range
    amax = np.abs(scale).max(-1)
    d = _f16(amax / 127.0)
    sc = np.clip(np.rint(scale / np.where(d > 0, d, 1)[:, None]), -128, 127).astype(np.int8)
    eff = d[:, None] * sc.astype(np.float32)
    q = np.clip(np.rint(xs / np.where(eff != 0, eff, 1)[..., None]), -32, 31)
    q = np.where(eff[..., None] != 0, q, 0).astype(np.int8)
    return d, sc, q


def q6_k_dequant(d, sc, q) -> np.ndarray:
    return ((d[:, None] * sc.astype(np.float32))[..., None] * q.astype(np.float32)).reshape(-1, QK_K)


def pack_q6_k(d, sc, q) -> np.ndarray:
    n = d.shape[0]
    u = (q.reshape(n, 2, 128).astype(np.int16) + 32).astype(np.uint8)  # two halves of 128
    low, high = u & 15, u >> 4
    # half h: byte l of ql holds element l (low nibble) and l+64 (high nibble)
    ql = (low[:, :, 0:64] | (low[:, :, 64:128] << 4)).reshape(n, 128)
    # byte l of qh holds the top 2 bits of elements l, l+32, l+64, l+96 at shifts 0, 2, 4, 6
    qh = (high[:, :, 0:32] | (high[:, :, 32:64] << 2) | (high[:, :, 64:96] << 4) | (high[:, :, 96:128] << 6))
    qh = qh.reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8).reshape(n, 16),
                           d.astype(np.float16).view(np.uint8).reshape(n, 2)], axis=1)


def quantize(arr: np.ndarray, qtype) -> np.ndarray:
    """Bytes of ``arr`` ([..., ne0], ne0 % 256 == 0) as Q4_K or Q6_K, shaped like gguf.quants.quantize's."""
    import gguf

    shape = arr.shape
    if qtype == gguf.GGMLQuantizationType.Q4_K:
        blocks = pack_q4_k(*q4_k_codes(arr))
    elif qtype == gguf.GGMLQuantizationType.Q6_K:
        blocks = pack_q6_k(*q6_k_codes(arr))
    else:
        raise ValueError(f"kquants packs Q4_K and Q6_K only, not {qtype}")
    return blocks.reshape(gguf.quant_shape_to_byte_shape(shape, qtype))
