"""Training loops of Learngene-SWS: the ancestry (teacher), the Aux-Net by distillation, descendants.

One loop for all three (DeiT's recipe, shrunk): AdamW, linear warmup then cosine decay to ``min_lr``,
per step, optional global grad-norm clipping (DeiT's --clip-grad; the Aux-Net default uses it, see
LearngeneConfig); batches drawn from a private generator, so model + data + seed give the same weights.
The Aux-Net's loss is DeiT's ``DistillationLoss`` with soft targets:

    L = (1 - alpha) CE(f(x), y) + alpha tau^2 KL(p_tau(g(x)) || p_tau(f(x))) / C

where the KL is summed over the batch and divided by its number of entries (batch x classes, DeiT's
``reduction='sum' / numel``). The teacher runs in eval mode under no_grad. With alpha = 1 (the
reference default) labels are unused; the CE term is then skipped, not computed and weighted by 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    epochs: int
    lr: float
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    min_lr: float = 1e-5
    batch_size: int = 64
    alpha: float = 1.0  # weight of the distillation term (used only with a teacher)
    tau: float = 1.0
    clip_grad: float | None = None  # max global L2 norm of the gradient (DeiT's --clip-grad); None: no clipping

    def __post_init__(self):
        if self.epochs < 0 or self.lr <= 0 or self.batch_size < 1 or not 0 <= self.alpha <= 1 or self.tau <= 0 \
                or (self.clip_grad is not None and not self.clip_grad > 0):
            raise ConfigError(f"invalid training recipe {self}: epochs >= 0, lr > 0, batch_size >= 1, "
                              "0 <= alpha <= 1, tau > 0, clip_grad > 0 or None")


@dataclass
class History:
    loss: list[float] = field(default_factory=list)  # mean training loss per epoch
    grad_norm: list[float] = field(default_factory=list)  # largest global grad norm per epoch, before clipping
    clipped: int = 0  # steps whose gradient was scaled down to clip_grad
    steps: int = 0


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor | None,
            alpha: float = 1.0, tau: float = 1.0) -> torch.Tensor:
    """DeiT's soft distillation loss (see the module docstring); ``teacher_logits`` must carry no grad."""
    if teacher_logits.requires_grad:
        raise ValueError("teacher logits must be computed without grad (torch.no_grad)")
    kd = F.kl_div(F.log_softmax(student_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                  reduction="sum", log_target=True) * (tau * tau) / student_logits.numel()
    if alpha >= 1.0:
        return kd
    return (1.0 - alpha) * F.cross_entropy(student_logits, y) + alpha * kd


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warmup from lr/warmup to lr over ``warmup`` steps, then cosine from lr to min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: Recipe, seed: int = 0,
          teacher: nn.Module | None = None, eval_fn=None) -> History:
    """Train ``model`` in place; with ``teacher`` by distillation (``kd_loss``), else by cross-entropy.

    ``eval_fn(epoch, model)``, when given, is called after every epoch (curves for the benchmark).
    """
    gen = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(len(y) / recipe.batch_size)
    total = recipe.epochs * per_epoch
    warmup = int(round(recipe.warmup_epochs * per_epoch))
    decay, no_decay = [], []
    params = list(model.parameters())  # shared blocks appear once
    for name, p in model.named_parameters():
        # DeiT: no weight decay on biases, norms (1-D) and the position embedding
        (no_decay if p.ndim <= 1 or name.endswith("pos_embed") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)
    if teacher is not None:
        teacher.eval()
    hist = History()
    step = 0
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(y), generator=gen)
        tot, n, gmax = 0.0, 0, 0.0
        for start in range(0, len(y), recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warmup, recipe.lr, recipe.min_lr)
            with torch.random.fork_rng(devices=[]):  # drop-path draws from the seeded generator's stream
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
                logits = model(x[idx])
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x[idx])
                loss = kd_loss(logits, t_logits, y[idx], recipe.alpha, recipe.tau)
            else:
                loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = _grad_norm(params, recipe.clip_grad)
            hist.clipped += int(recipe.clip_grad is not None and gn > recipe.clip_grad)
            opt.step()
            tot += loss.item() * len(idx)
            n += len(idx)
            gmax = max(gmax, gn)
            step += 1
        hist.loss.append(tot / max(n, 1))
        hist.grad_norm.append(gmax)
        if eval_fn is not None:
            eval_fn(epoch + 1, model)
    hist.steps = step
    model.eval()
    return hist


def _grad_norm(params: list[torch.Tensor], clip: float | None) -> float:
    """The global L2 norm of the gradients; with ``clip``, scale them down to at most ``clip`` (the norm
    returned is the one before clipping)."""
    if clip is not None:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    try:
        return (model(x).argmax(1) == y).float().mean().item()
    finally:
        model.train(was)
