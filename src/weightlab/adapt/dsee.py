"""DSEE (Chen et al. 2021): low-rank plus sparse update, then magnitude pruning of the weights.

Stage 1: W_eff = W + s (B A + Omega ⊙ S), s = alpha/r on both terms. W frozen; A (r x in)
~ N(0, 0.02), B = 0, S = 0 trainable; Omega is a fixed support of ``num_sparse`` entries per
matrix, the largest entries of the sparse part of a GreBsmo-style split W ~ U V + S0 (options:
random, magnitude of W, residual of the rank-r SVD). Parameters r(in+out) + num_sparse.

Stage 2 (:func:`prune`, or ``prune_at`` inside a training loop through ``adapt.step_hooks``):
global unstructured magnitude pruning at ratio p over the adapted layers, scored on the merged
weight W + s(BA + Omega⊙S); the original W values stay but the mask M stays on W, and training
of the adapters goes on: W_eff = M⊙W + s(BA + Omega⊙S). Other layers (K, O, MLP) can be
pruned in the same call, scored on their own W (a separate global group, as in the paper).

Merging is exact, but BA is dense, so a merged weight is dense again. :func:`prune_merged`
magnitude-prunes merged plain layers for sparse final weights. The reference's merge mode
"WABS" adds BA without alpha/r while its forward scales by alpha/r (2x off at alpha=32, r=16);
here the merge uses the forward's scaling.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from ..tensor.svd import randomized_svd, truncated_svd
from . import _sparse
from .layer import AdapterMethod, get_weight_2d, layer_kind, rank_of, set_weight_2d


class DseeConfig(MethodConfig):
    r: int = 16
    alpha: float = 32.0
    num_sparse: int = 128
    omega: Literal["grebsmo", "random", "magnitude", "svd"] = "grebsmo"
    grebsmo_threshold: float = 0.01
    grebsmo_rank_step: int = 5
    grebsmo_iters: int | None = None  # None: 100, fewer where the rank would pass 65% of min(out, in)
    grebsmo_inner: int = 2
    sparsity: float = 0.2  # stage-2 pruning ratio p
    prune_at: float | None = None  # fraction of training after which stage 2 prunes (None: never)
    seed: int = 0


def grebsmo_sparse(W: torch.Tensor, threshold: float = 0.01, rank_step: int = 5, iters: int | None = None,
                   inner: int = 2, seed: int = 0) -> torch.Tensor:
    """Sparse part S of a greedy bilateral split W ~ U V + S (GreBsmo as DSEE uses it).

    Each outer iteration grows the rank by ``rank_step`` with the top singular directions of the
    residual, then alternates U = QR((W - S) V^T), V = U^T (W - S), S = hard_threshold(W - U V)
    ``inner`` times. ``iters=None``: the reference's 100 iterations end near rank 500 on BERT's
    768-wide matrices; on smaller ones the rank would reach full and the low-rank part would
    swallow the sparse one, so weightlab stops at 65% of min(out, in) (500/768).
    """
    W = W.float()
    full = min(W.shape)
    if iters is None:
        iters = max(1, min(100, int(0.65 * full) // rank_step))
    S = torch.zeros_like(W)
    V = torch.zeros(0, W.shape[1])
    for it in range(iters):
        k = min(V.shape[0] + rank_step, full)
        if k > V.shape[0]:
            R = W - S - (W - S) @ V.t() @ V if V.shape[0] else W - S
            _, _, Vh = randomized_svd(R, k - V.shape[0], niter=2, seed=seed + it)
            V = torch.cat([V, Vh], 0)
        for _ in range(inner):
            U, _ = torch.linalg.qr((W - S) @ V.t())
            V = U.t() @ (W - S)
            E = W - U @ V
            S = torch.where(E.abs() > threshold, E, torch.zeros_like(E))
        V = torch.linalg.qr(V.t())[0].t()  # keep the row basis orthonormal for the next growth
    return S


def omega_support(W: torch.Tensor, cfg: DseeConfig, r: int) -> torch.Tensor:
    n = min(cfg.num_sparse, W.numel())
    if cfg.omega == "random":
        g = torch.Generator().manual_seed(cfg.seed)
        return _sparse.random_support(*W.shape, n, g)
    if cfg.omega == "magnitude":
        return _sparse.top_support(W.abs(), n)
    if cfg.omega == "svd":
        U, S, Vh = truncated_svd(W, r)
        return _sparse.top_support((W - (U * S) @ Vh).abs(), n)
    S0 = grebsmo_sparse(W, cfg.grebsmo_threshold, cfg.grebsmo_rank_step, cfg.grebsmo_iters, cfg.grebsmo_inner,
                        cfg.seed)
    return _sparse.top_support(S0.abs(), n)


@register("adapt", "dsee", kind="adapter", regime=Regime.WHOLE_MODEL, config=DseeConfig,
          paper="Chen et al. 2021, DSEE: Dually Sparsity-Embedded Efficient Tuning of Pre-trained Language "
                "Models (arXiv 2111.00160)",
          summary="low-rank B@A plus a fixed sparse update (GreBsmo support), then global magnitude pruning of W",
          layers="linear, conv1d", trainable="r*(in+out) + num_sparse")
class DSEE(AdapterMethod):
    name = "dsee"
    invertible = False  # pruned entries of W cannot be recovered from the merged weight

    def scale(self, layer) -> float:
        return self.cfg.alpha / layer.adapter.lora_A.shape[0]

    def create(self, layer, W0, init=True):
        out_f, in_f = W0.shape
        r = rank_of(self.cfg.r, out_f, in_f)
        n = min(self.cfg.num_sparse, W0.numel())
        a = layer.adapter
        A = torch.zeros(r, in_f)
        if init:
            A.normal_(0, 0.02, generator=torch.Generator().manual_seed(self.cfg.seed))
            idx = omega_support(W0, self.cfg, r)
        else:
            idx = torch.zeros(n, dtype=torch.long)
        a.lora_A = nn.Parameter(A)
        a.lora_B = nn.Parameter(torch.zeros(out_f, r))
        a.S = nn.Parameter(torch.zeros(n))
        a.register_buffer("omega", idx)
        a.register_buffer("mask", torch.ones(out_f, in_f, dtype=torch.bool))
        layer.pruned = False
        return W0

    def rebase(self, layer, W0):
        layer.pruned = not bool(layer.adapter.mask.all())
        return W0

    def update(self, layer) -> torch.Tensor:
        """s (B A + Omega ⊙ S), float32 (out, in)."""
        a = layer.adapter
        D = a.lora_B @ a.lora_A + _sparse.scatter(a.S, a.omega, (layer.out_features, layer.in_features))
        return self.scale(layer) * D

    def delta(self, layer, W):
        d = self.update(layer)
        if layer.pruned:
            d = d - W * (~layer.adapter.mask)
        return d

    def forward(self, layer, x):
        a = layer.adapter
        if layer.pruned:
            Wm = layer.weight_2d() * layer.adapter.mask
            y = layer.functional(x, Wm.to(x.dtype))
        else:
            y = layer.base_layer(x)
        s = self.scale(layer)
        low = (x @ a.lora_A.t().to(x.dtype)) @ a.lora_B.t().to(x.dtype)
        sp = _sparse.sparse_matmul(x, a.omega, a.S, layer.out_features, layer.in_features)
        return y + s * (low + sp)

    @classmethod
    def on_model_step(cls, layers, step, total_steps):
        cfg = layers[0].method.cfg
        if cfg.prune_at is None or any(l.pruned for l in layers):
            return
        if step >= max(1, math.ceil(cfg.prune_at * total_steps)):
            prune_layers(layers, cfg.sparsity)

    def trainable_count(self, out_f, in_f):
        return rank_of(self.cfg.r, out_f, in_f) * (out_f + in_f) + min(self.cfg.num_sparse, out_f * in_f)

    @classmethod
    def peft_factors(cls, t, cfg, W0, svd_rank):
        if W0 is None or not svd_rank:
            raise ConfigError("dsee is low-rank plus sparse, not LoRA-shaped: export it to PEFT with an SVD rank "
                              "(svd_rank=..., --svd-rank) and the base model")
        from ..tensor.svd import lowrank_factor

        out_f, in_f = W0.shape
        s = cfg.alpha / t["lora_A"].shape[0]
        D = s * (t["lora_B"].float() @ t["lora_A"].float() + _sparse.scatter(t["S"].float(), t["omega"],
                                                                             (out_f, in_f)))
        D = D - W0.float() * (~t["mask"].bool())
        return lowrank_factor(D, svd_rank)


@torch.no_grad()
def prune_layers(layers, sparsity: float) -> dict[str, float]:
    """Stage 2 on DSEE layers: one global magnitude mask on W, scored on the merged weight."""
    scores = {l.layer_name: l.merged_weight().abs() for l in layers}
    masks = _sparse.global_magnitude_masks(scores, sparsity)
    for l in layers:
        l.adapter.mask.copy_(masks[l.layer_name])
        l.pruned = True
    return {n: 1 - float(m.float().mean()) for n, m in masks.items()}


@torch.no_grad()
def prune(model: nn.Module, sparsity: float = 0.2, others=None) -> dict[str, float]:
    """DSEE stage 2: mask W of the DSEE layers at ``sparsity`` (global, scored on the merged weight) and
    zero the lowest-|W| entries of the ``others`` layers (name suffixes, a separate global group).

    Returns each layer's sparsity. Training the adapters can continue afterwards.
    """
    from .api import adapter_layers, select_targets

    if not 0 <= sparsity < 1:
        raise ConfigError(f"dsee pruning sparsity must be in [0, 1), got {sparsity}")
    layers = [l for l in adapter_layers(model).values() if isinstance(l.method, DSEE)]
    if not layers:
        raise ConfigError("the model has no dsee adapter attached; attach one before pruning")
    report = prune_layers(layers, sparsity)
    if others:
        mods = {n: model.get_submodule(n) for n in select_targets(model, others)}
        scores = {n: get_weight_2d(m).abs() for n, m in mods.items()}
        for n, keep in _sparse.global_magnitude_masks(scores, sparsity).items():
            set_weight_2d(mods[n], get_weight_2d(mods[n]).float() * keep)
            report[n] = 1 - float(keep.float().mean())
    return report


@torch.no_grad()
def prune_merged(model: nn.Module, sparsity: float, targets) -> dict[str, float]:
    """Global magnitude pruning of plain (merged) layers: sparse final weights after ``adapt.fold``."""
    from .api import select_targets

    mods = {n: model.get_submodule(n) for n in select_targets(model, targets)}
    bad = [n for n, m in mods.items() if layer_kind(m) is None]
    if bad:
        raise ConfigError(f"prune_merged needs plain layers; merge the adapters first ({bad[0]})")
    scores = {n: get_weight_2d(m).abs() for n, m in mods.items()}
    report = {}
    for n, keep in _sparse.global_magnitude_masks(scores, sparsity).items():
        set_weight_2d(mods[n], get_weight_2d(mods[n]).float() * keep)
        report[n] = 1 - float(keep.float().mean())
    return report


__all__ = ["DSEE", "DseeConfig", "grebsmo_sparse", "prune", "prune_merged"]
