"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", 2023).

The SparseGPT/OBS loop of tensor/obs.py with ``q = quant(w)``: columns are quantized left to
right, each error ``(w - q) / U_ii`` is pushed onto the not-yet-quantized columns through the
upper Cholesky factor U of the damped inverse Hessian, with lazy updates every ``blocksize``
columns. Groups: quantizer parameters are fitted on the *current, already updated* weights
when the column index reaches a group start (``static_groups``: fitted once on the original
W). ``act_order`` processes columns by descending diag(H) and undoes the permutation at the
end (the group of column j is then recorded in ``g_idx``).

`obs_quantize` is the loop with a pluggable per-column quantizer (PB-LLM reuses it).
"""
from __future__ import annotations

from typing import Callable

import torch

from .obs import damped_hessian, upper_inverse_factor
from .quant import SCALE_DTYPES, AffineQuant, check_bits, find_params, group_index, num_groups, to_codes


def obs_quantize(W: torch.Tensor, U: torch.Tensor, column: Callable, blocksize: int = 128, inplace: bool = False,
                 keep_q: bool = True):
    """Error-feedback loop. ``column(j, W1, i) -> q`` quantizes column j (local index i of the
    current block W1, whose columns i.. are up to date). Returns (Q, loss) with
    loss = sum (w - q)^2 / (2 U_jj^2) = 1/2 tr((W - Q) H_damped (W - Q)^T). ``inplace``: W is the
    caller's scratch copy and is overwritten; ``keep_q=False``: Q is not kept (None), for callers
    that record the codes themselves (each saves a d_out x d_in matrix at the peak)."""
    if not inplace:
        W = W.clone()
    rows, cols = W.shape
    Q = torch.zeros_like(W) if keep_q else None
    loss = torch.zeros((), dtype=W.dtype, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            q = column(i1 + i, W1, i)
            if Q is not None:
                Q[:, i1 + i] = q
            err = (w - q) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)  # in place: no (rows x block) temporary per column
            Err1[:, i] = err
        loss += (Err1 ** 2).sum() / 2  # (w - q)^2 / (2 U_ii^2) summed over the block's columns
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return Q, float(loss)


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = -1, sym: bool = False,
         act_order: bool = False, static_groups: bool = False, blocksize: int = 128, percdamp: float = 0.01,
         scale_dtype: str = "float16", dtype: torch.dtype = torch.float64,
         own_h: bool = False, keep: torch.Tensor | None = None) -> tuple[AffineQuant, float]:
    """GPTQ-quantize W (out x in) against the Hessian proxy H (in x in). Returns (AffineQuant, loss).

    With groups, ``blocksize`` is rounded to a multiple of ``group_size`` so every group lies in
    one lazy block (its parameters then see all earlier updates). A partial last group is fine.
    ``keep``: a boolean (out x in) mask of weights that must come out exactly 0 (a pruned model's
    zeros): they are set to the grid's zero level (code = zero point) and, as in SparseGPT, the
    error of doing so is pushed onto the later columns; group grids are fitted without them.
    """
    check_bits(bits)
    rows, cols = W.shape
    W64, Hd = damped_hessian(H, W, percdamp, dtype, own_h)
    perm = (torch.argsort(torch.diag(Hd), descending=True, stable=True) if act_order
            else torch.arange(cols, device=W.device))
    # one factorization, of the matrix in processing order, in place (Hd is not needed afterwards)
    U = upper_inverse_factor(Hd[perm][:, perm] if act_order else Hd, inplace=True)
    del Hd
    G = num_groups(cols, group_size)
    scales = torch.zeros(rows, G, dtype=dtype, device=W.device)
    zeros = torch.zeros(rows, G, dtype=dtype, device=W.device)
    g_idx = group_index(cols, group_size, W.device)  # group of each ORIGINAL column
    if group_size > 0:
        blocksize = group_size * max(1, blocksize // group_size)
        if static_groups:
            for g in range(G):
                sl = slice(g * group_size, min((g + 1) * group_size, cols))
                scales[:, g], zeros[:, g] = find_params(W64[:, sl], bits, sym, scale_dtype)
        elif act_order:
            g_idx = torch.empty(cols, dtype=torch.long, device=W.device)
            g_idx[perm] = torch.arange(cols, device=W.device) // group_size
    else:
        scales[:, 0], zeros[:, 0] = find_params(W64, bits, sym, scale_dtype)
    if act_order:
        W64 = W64[:, perm]
        keep = keep[:, perm] if keep is not None else None
    codes_p = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)  # in processing order; codes < 256
    dynamic = group_size > 0 and not static_groups
    group_of = g_idx[perm].tolist()  # plain ints: tensor indexing per column costs more than the column's maths

    def column(j, W1, i):
        g = group_of[j]
        if dynamic and j % group_size == 0:
            win = W1[:, i:i + group_size]
            if keep is not None:  # the forced zeros are on every grid (xmin <= 0 <= xmax); fit on the rest
                win = win.masked_fill(keep[:, j:j + win.shape[1]], 0)
            scales[:, g], zeros[:, g] = find_params(win, bits, sym, scale_dtype)
        s, z = scales[:, g], zeros[:, g]
        c = to_codes(W1[:, i], s, z, bits)
        if keep is not None:
            c = torch.where(keep[:, j], z, c)
        codes_p[:, j] = c
        return s * (c - z)

    _, loss = obs_quantize(W64, U, column, blocksize, inplace=True, keep_q=False)
    codes = torch.empty_like(codes_p)
    codes[:, perm] = codes_p
    aq = AffineQuant(codes.to(torch.uint8), scales.to(SCALE_DTYPES[scale_dtype]), zeros.to(torch.uint8),
                     g_idx.to(torch.int32), bits, group_size, sym)
    return aq, loss
