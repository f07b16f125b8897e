"""Sparse pieces shared by DSEE, SaRA, SLTrain and PST: supports as sorted flat indices, scatters,
a sparse-times-dense product, a low-rank-plus-sparse linear op that does not keep W, and a
global magnitude mask.

A support is a sorted 1-D long tensor of flat indices into an (out, in) matrix; its values are a
1-D tensor of the same length. Sorting keeps saved adapters and gathers deterministic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def random_support(out_f: int, in_f: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` flat indices drawn uniformly without replacement, sorted."""
    return torch.randperm(out_f * in_f, generator=generator)[:n].sort().values


def top_support(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Flat indices of the ``n`` largest scores (ties to the lowest index), sorted."""
    order = torch.sort(scores.reshape(-1), descending=True, stable=True).indices
    return order[:n].sort().values


def scatter(values: torch.Tensor, index: torch.Tensor, shape) -> torch.Tensor:
    """Dense matrix of ``shape`` with ``values`` at ``index`` and zeros elsewhere (differentiable in values)."""
    n = shape[0] * shape[1]
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_put((index,), values).view(shape)


def replace(W: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of W with the entries at ``index`` replaced by ``values`` (differentiable in values)."""
    return W.reshape(-1).index_put((index,), values.to(W.dtype)).view(W.shape)


def sparse_matmul(x: torch.Tensor, index: torch.Tensor, values: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    """x S^T for S = scatter(values, index, (out_f, in_f)) without building S.

    Gathers the ``nnz`` needed input columns, so it suits small supports (DSEE's few entries);
    dense supports are cheaper as a materialized matrix.
    """
    rows, cols = index // in_f, index % in_f
    contrib = x[..., cols] * values.to(x.dtype)
    out = x.new_zeros(*x.shape[:-1], out_f)
    return out.index_add(-1, rows, contrib)


class LowRankSparseLinear(torch.autograd.Function):
    """y = x (B A + S)^T + bias with S = scatter(V, I); saves only (x, B, A, V, I), not W.

    The backward rebuilds W for the input gradient and forms dW = G^T X once:
    dB = dW A^T, dA = B^T dW, dV = dW.flatten()[I] (SLTrain's memory-lean linear).
    """

    @staticmethod
    def forward(ctx, x, B, A, V, I, bias):
        W = _dense(B, A, V, I)
        ctx.save_for_backward(x, B, A, V, I)
        ctx.has_bias = bias is not None
        return F.linear(x, W.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, g):
        x, B, A, V, I = ctx.saved_tensors
        gx = gB = gA = gV = gb = None
        if ctx.needs_input_grad[0]:
            gx = g @ _dense(B, A, V, I).to(g.dtype)
        if any(ctx.needs_input_grad[1:4]):
            g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
            dW = (g2.t() @ x2).to(B.dtype)
            if ctx.needs_input_grad[1]:
                gB = dW @ A.t()
            if ctx.needs_input_grad[2]:
                gA = B.t() @ dW
            if ctx.needs_input_grad[3]:
                gV = dW.reshape(-1)[I]
        if ctx.has_bias and ctx.needs_input_grad[5]:
            gb = g.reshape(-1, g.shape[-1]).sum(0)
        return gx, gB, gA, gV, None, gb


def _dense(B, A, V, I):
    return (B @ A).reshape(-1).index_add(0, I, V.to(B.dtype)).view(B.shape[0], A.shape[1])


def low_rank_sparse_linear(x, B, A, V, I, bias=None):
    return LowRankSparseLinear.apply(x, B, A, V, I, bias)


def global_magnitude_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks pruning exactly floor(sparsity * total) of the lowest scores over all matrices together."""
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores.values()])
    k = int(sparsity * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.sort(flat, stable=True).indices[:k]] = False
    out, o = {}, 0
    for name, s in scores.items():
        out[name] = keep[o:o + s.numel()].view(s.shape).to(s.device)
        o += s.numel()
    return out


def resize_on_load(module: nn.Module, names: tuple[str, ...]) -> None:
    """Let ``module.load_state_dict`` accept tensors ``names`` of another size (supports that were re-selected)."""

    def hook(mod, state_dict, prefix, *args):
        for n in names:
            t = state_dict.get(prefix + n)
            cur = getattr(mod, n, None)
            if t is None or cur is None or cur.shape == t.shape:
                continue
            if isinstance(cur, nn.Parameter):
                cur.data = torch.empty(t.shape, dtype=cur.dtype, device=cur.device)
            else:
                mod._buffers[n] = torch.empty(t.shape, dtype=cur.dtype, device=cur.device)

    module.register_load_state_dict_pre_hook(hook)
