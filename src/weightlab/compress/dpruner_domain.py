"""D-Pruner steps 2-3: the regularized domain pass and the dual importance (the reference's `src/lomo.py`
driven by `src/lomo_trainer.py`).

The reference fine-tunes the whole model on the domain set with LOMO (plain SGD fused into the
backward pass, global grad-norm clipping, linear schedule with warmup) and, at every step, before
each target matrix is updated:

    g_s  = S * g                                     (S: the fp16 loss scale still on the gradient)
    g_s' = g_s + lambda * 2 * lr^2 * G * g_s^2 / 1000  (the regularizer's gradient, G = general importance)
    t    = g_s' * w
    I   += | t + t^2 / 2000 + w^3 |                   (accumulated over every step of every epoch)
    w   -= lr * clip * g_s' / S                       (clip from the norm of all unscaled gradients)

The final mask is taken from I and applied to the *original* weights: the fine-tuned weights
only shape the importance. Parameters without G (embeddings, norms, head) are trained with the
plain gradient. With ``train=False`` nothing is updated (the score-only variant).
"""
from __future__ import annotations

import torch

from ..engine.calibration import is_conv1d_hf
from ..engine.progress import progress


def lr_at(step: int, n_steps: int, lr: float, warmup: float) -> float:
    """The reference's LearningRateScheduler ('linear'): ``step`` counts from 1; the last step gets 0."""
    progress_ = step / max(2, n_steps)
    warm = warmup / n_steps if warmup > 1 else warmup
    if progress_ < warm:
        return lr * progress_ / warm
    return lr * max((progress_ - 1.0) / (warm - 1.0), 0.0)


def regularized_grad(g: torch.Tensor, general: torch.Tensor | None, lam: float, lr: float, scale: float,
                     reg_div: float = 1000.0) -> torch.Tensor:
    """g_s' = S g + 2 lambda lr^2 G (S g)^2 / reg_div, still multiplied by the loss scale S."""
    gs = g * scale
    if general is None or lam == 0:
        return gs
    return gs + lam * 2 * lr ** 2 * general * gs * gs / reg_div


def step_importance(gs_reg: torch.Tensor, w: torch.Tensor, second_div: float = 2000.0,
                    cubic: bool = True) -> torch.Tensor:
    """| t + t^2 / second_div + w^3 | with t = g_s' w (one step's contribution)."""
    t = gs_reg * w
    s = t + t * t / second_div
    if cubic:
        s = s + w ** 3
    return s.abs()


def _param_layout(mod, t: torch.Tensor) -> torch.Tensor:
    t = t.T if is_conv1d_hf(mod) else t
    return t.reshape(mod.weight.shape)


def domain_importance(model: torch.nn.Module, layers: dict, ids: torch.Tensor, general: dict | None, cfg, *,
                      seed: int = 0, show_progress=None) -> dict[str, torch.Tensor]:
    """{layer: accumulated dual importance (out, in)} from the regularized pass over ``ids`` (N, T).

    The model's parameters are restored before returning (the reference prunes the original model).
    ``cfg`` carries lambda_, lr, epochs, batch_size, warmup, clip_grad_norm, grad_scale, reg_div,
    second_div, cubic and train."""
    params = dict(model.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()} if cfg.train else {}
    flags = {n: p.requires_grad for n, p in params.items()}
    target = {n: m.weight for n, m in layers.items()}
    G = {n: _param_layout(layers[n], general[n].to(p.device, torch.float32)) if general else None
         for n, p in target.items()}
    acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in target.items()}
    trainable = [p for p in params.values()] if cfg.train else list(target.values())
    for p in params.values():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    target_ids = {id(p) for p in target.values()}
    n = ids.shape[0]
    per_epoch = -(-n // cfg.batch_size)
    n_steps = per_epoch * cfg.epochs
    prev_lr = 0.0  # the reference's norm pass sees the lr of the step before (0 on the first)
    model.eval()  # no dropout: the reference's two forwards per step then see the same function
    try:
        for epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
            chunks = order.split(cfg.batch_size)
            for step, idx in enumerate(progress(chunks, f"dpruner domain epoch {epoch + 1}",
                                                enabled=show_progress), start=1):
                lr = lr_at(per_epoch * epoch + step, n_steps, cfg.lr, cfg.warmup)
                batch = ids[idx].to(next(iter(target.values())).device)
                model.zero_grad(set_to_none=True)
                model(input_ids=batch, labels=batch).loss.backward()
                _dual_step(model, layers, target, target_ids, trainable, G, acc, cfg, lr, prev_lr)
                prev_lr = lr
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.grad = None
                if name in saved:
                    p.copy_(saved[name])
                p.requires_grad_(flags[name])
    out = {}
    for name, a in acc.items():
        a = a.T if is_conv1d_hf(layers[name]) else a
        out[name] = a.reshape(a.shape[0], -1)
    return out


@torch.no_grad()
def _dual_step(model, layers, target, target_ids, trainable, G, acc, cfg, lr, prev_lr) -> None:
    S = cfg.grad_scale
    by_id = {id(p): n for n, p in target.items()}
    clip = 1.0
    if cfg.train and cfg.clip_grad_norm and cfg.clip_grad_norm > 0:
        norms = []
        for p in trainable:
            if p.grad is None:
                continue
            g = p.grad.float()
            if id(p) in target_ids:
                g = regularized_grad(g, G[by_id[id(p)]], cfg.lambda_, prev_lr, S, cfg.reg_div) / S
            norms.append(torch.linalg.vector_norm(g))
        total = torch.linalg.vector_norm(torch.stack(norms))
        clip = min(float(cfg.clip_grad_norm / (total + 1e-6)), 1.0)
    for p in trainable:
        if p.grad is None:
            continue
        g = p.grad.float()
        if id(p) in target_ids:
            name = by_id[id(p)]
            gs = regularized_grad(g, G[name], cfg.lambda_, lr, S, cfg.reg_div)
            acc[name] += step_importance(gs, p.detach().float(), cfg.second_div, cfg.cubic)
            g = gs / S
        if cfg.train:
            p.add_((g * clip).to(p.dtype), alpha=-lr)
