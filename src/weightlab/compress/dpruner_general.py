"""D-Pruner step 1: general weight importance on open-domain data (the reference's `code/general.py`).

The reference runs a SparseGPT pass (all linears of a block at once, block-sequential, so later
blocks see inputs that went through the pruned earlier ones) and, instead of keeping the pruned
model, saves the OBS saliency w^2 / U_jj^2 it ranks by: in each 128-column lazy block it is taken
on the *current* weights (already moved by the OBS updates of the blocks before it), where
U = upper Cholesky factor of (H + damp I)^-1, H = 2/N_seq sum x x^T. The model is then discarded;
the domain pass starts again from the dense weights. Here the pass runs on the model and every
touched weight is restored afterwards.
"""
from __future__ import annotations

import torch

from ..engine.calibration import layerwise, set_weight_matrix, weight_matrix
from ..tensor.obs import inverse_hessian_factor, solver_dtype


def obs_saliency(W: torch.Tensor, H: torch.Tensor, sparsity: float, blocksize: int = 128, percdamp: float = 0.01,
                 dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(saliency, pruned W) of one SparseGPT pass as the reference's General_Pruner runs it.

    Per lazy block the saliency is W1^2 / diag(U1)^2 on the updated block; the reference prunes the
    entries with saliency <= the value at sorted index int(sparsity * numel) (so k + 1 entries and ties;
    it only steers the updates here, the mask itself is never used) and applies SparseGPT's
    error feedback to the columns on the right.
    """
    U, W, _ = inverse_hessian_factor(H, W, percdamp, dtype, keep_h=False)
    rows, cols = W.shape
    sal = torch.empty_like(W)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        score = W1 ** 2 / d.view(1, -1) ** 2
        sal[:, i1:i2] = score
        thresh = torch.sort(score.reshape(-1)).values[int(score.numel() * sparsity)]
        prune1 = score <= thresh
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w = W1[:, i]
            q = w.masked_fill(prune1[:, i], 0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return sal.float(), W.float()


def general_importance(model: torch.nn.Module, layers: dict, batches: list, *, sparsity: float = 0.5,
                       blocksize: int = 128, percdamp: float = 0.01, precision: str = "auto",
                       show_progress=None) -> dict[str, torch.Tensor]:
    """{layer name: saliency (out, in), float32} from a block-sequential SparseGPT pass on ``batches``.

    The model's weights are the same afterwards (the pass prunes to feed the next blocks, as the
    reference does, and the originals are put back)."""
    originals = {n: weight_matrix(m) for n, m in layers.items()}
    out: dict[str, torch.Tensor] = {}

    def on_block(i, name, ls, stats):
        for n, m in ls.items():
            w = weight_matrix(m)
            dt = solver_dtype(precision, w.device)
            sal, pruned = obs_saliency(w, stats[n].take_H(), sparsity, blocksize, percdamp, dt)
            out[n] = sal.cpu()
            set_weight_matrix(m, pruned)

    try:
        layerwise(model, batches, on_block, hessian=True, layer_filter=layers.__contains__,
                  show_progress=show_progress)
    finally:
        for n, m in layers.items():
            set_weight_matrix(m, originals[n].to(m.weight.device))
    return out
