"""Exact Q8_0 / Q4_0 blocks for weights that already lie on a symmetric integer grid.

A weightlab-quantized model (symmetric int8 or int4, groups of 32, or larger groups: every
32-block then shares its group's scale) stores w = fp32(s * q) with s an fp16 value. Q8_0 and
Q4_0 hold exactly (fp16 d, integer q) per 32 weights, so such weights can be packed without
any loss. gguf-py's quantizer re-derives d = max / -8 (Q4_0) or max / 127 (Q8_0) and is not
exact on them, so we search the scale ourselves and accept a tensor only if every block
reproduces every weight bit for bit; otherwise the caller falls back to gguf-py.
"""
from __future__ import annotations

import numpy as np

BLOCK = 32


def _find_scales(x: np.ndarray, qmin: int, qmax: int):
    """(d as fp16, q) per block such that fp32(d * q) == x exactly, or None if some block has none."""
    m = np.abs(x).max(axis=1)
    d = np.zeros(x.shape[0], dtype=np.float16)
    q = np.zeros(x.shape, dtype=np.int64)
    done = m == 0  # all-zero block: d = 0, q = 0
    top = max(-qmin, qmax)
    # the largest |w| of a block is s * k for the code k it got; k is near the top of the range for
    # min-max grids, lower after GPTQ's updates; each candidate is checked exactly, never assumed
    for k in range(top, top // 2 - 1, -1):
        todo = ~done
        if not todo.any():
            break
        with np.errstate(divide="ignore", invalid="ignore"):
            s16 = (m[todo] / k).astype(np.float16)
            s = s16.astype(np.float32)[:, None]
            qq = np.rint(x[todo] / s)
        ok = np.isfinite(qq).all(1) & (qq >= qmin).all(1) & (qq <= qmax).all(1)
        ok &= ((s * np.nan_to_num(qq)).astype(np.float32) == x[todo]).all(1) & (s16 > 0)
        idx = np.flatnonzero(todo)[ok]
        d[idx] = s16[ok]
        q[idx] = qq[ok].astype(np.int64)
        done[idx] = True
        if k == top - 1 and done.mean() < 0.5:
            return None  # most blocks do not even use the top codes: not a grid, stop searching early
    if not done.all():
        return None
    return d, q


def exact_q8_0(arr: np.ndarray) -> np.ndarray | None:
    """Q8_0 bytes [..., ne0/32*34] reproducing ``arr`` exactly, or None when it is not on such a grid."""
    x = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1, BLOCK)
    found = _find_scales(x, -128, 127)
    if found is None:
        return None
    d, q = found
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), q.astype(np.int8).view(np.uint8)], axis=1)
    return blocks.reshape(*arr.shape[:-1], arr.shape[-1] // BLOCK * 34)


def exact_q4_0(arr: np.ndarray) -> np.ndarray | None:
    """Q4_0 bytes [..., ne0/32*18] reproducing ``arr`` exactly, or None."""
    x = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1, BLOCK)
    found = _find_scales(x, -8, 7)
    if found is None:
        return None
    d, q = found
    nib = (q + 8).astype(np.uint8)
    qs = nib[:, :16] | (nib[:, 16:] << 4)  # byte j: weight j in the low nibble, weight j+16 in the high
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), qs], axis=1)
    return blocks.reshape(*arr.shape[:-1], arr.shape[-1] // BLOCK * 18)
