"""Optimal Brain Surgeon updates with a damped inverse-Hessian factor (SparseGPT; GPTQ reuses it)."""
from __future__ import annotations

import torch


def inverse_hessian_factor(H: torch.Tensor, W: torch.Tensor, percdamp: float = 0.01,
                           dtype: torch.dtype = torch.float64, keep_h: bool = True, own_h: bool = False):
    """Upper Cholesky factor U of (H + lambda I)^-1 and the W with dead inputs zeroed.

    Dead inputs (H_jj = 0) get H_jj = 1 and a zero weight column; lambda = percdamp * mean diag H.
    Returns (U, W, H_damped); with ``keep_h=False`` the damped H is factored in place (one d x d
    matrix less at the peak) and None is returned for it. ``own_h``: the caller hands H over (it may be
    damped and factored in place when it already has ``dtype``).
    """
    W, H = damped_hessian(H, W, percdamp, dtype, own_h)
    if not keep_h:
        return upper_inverse_factor(H, inplace=True), W, None
    return upper_inverse_factor(H), W, H


def damped_hessian(H: torch.Tensor, W: torch.Tensor, percdamp: float = 0.01, dtype: torch.dtype = torch.float64,
                   own_h: bool = False):
    """(W with dead input columns zeroed, H + lambda I) in ``dtype``; dead inputs get H_jj = 1.

    ``own_h``: H is the caller's to give away, so it is damped in place when it already has ``dtype``."""
    H = H.to(dtype) if own_h else H.to(dtype, copy=True)
    W = W.to(dtype, copy=True)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    return W, H


def upper_inverse_factor(Hd: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Upper Cholesky factor of Hd^-1 (Hd already damped); ``inplace`` overwrites Hd (LAPACK works in place)."""
    if inplace:
        torch.linalg.cholesky(Hd, out=Hd)
        torch.cholesky_inverse(Hd, out=Hd)
        return torch.linalg.cholesky(Hd, upper=True, out=Hd)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)


def solver_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto': float32 on accelerators (what the reference GPTQ/SparseGPT code and llm-compressor use),
    float64 on the CPU (weightlab's exact reference: GPTQ with H = I reproduces RTN bit for bit)."""
    if precision == "auto":
        return torch.float64 if device.type == "cpu" else torch.float32
    return {"float64": torch.float64, "float32": torch.float32}[precision]


def sparsegpt(W: torch.Tensor, H: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
              blocksize: int = 128, percdamp: float = 0.01, dtype: torch.dtype = torch.float64,
              own_h: bool = False):
    """SparseGPT: prune and update W (out x in) to minimise ||(W - W_hat) X^T||^2.

    Unstructured: in each block of `blocksize` columns prune exactly int(sparsity * rows * cols)
    entries by w^2 / U_jj^2 on the current (already updated) weights. N:M: at each group start
    pick the n lowest scores of the next m columns per row. Returns (W_hat float32, mask, loss)
    where loss = sum of (w - q)^2 / (2 U_ii^2) = 1/2 tr((W - W_hat) H_damped (W - W_hat)^T).
    """
    U, W, _ = inverse_hessian_factor(H, W, percdamp, dtype, keep_h=False, own_h=own_h)
    rows, cols = W.shape
    mask = torch.ones_like(W, dtype=torch.bool)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        prune1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            score = W1 ** 2 / d.view(1, -1) ** 2
            k = int(sparsity * score.numel())
            if k > 0:
                prune1.view(-1)[torch.sort(score.reshape(-1), stable=True).indices[:k]] = True
        for i in range(count):
            w = W1[:, i]
            if nm is not None and i % nm[1] == 0:
                score = W1[:, i:i + nm[1]] ** 2 / d[i:i + nm[1]].view(1, -1) ** 2
                idx = torch.sort(score, dim=1, stable=True).indices[:, :nm[0]]
                prune1.scatter_(1, i + idx, True)
            q = w.masked_fill(prune1[:, i], 0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)  # in place: no (rows x block) temporary per column
            Err1[:, i] = err
        loss += (Err1 ** 2).sum() / 2  # (w - q)^2 / (2 U_ii^2) summed over the block's columns
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = ~prune1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W.float(), mask, float(loss)
