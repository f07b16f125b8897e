"""Training loops with held masks, and the FLOP accounting that SPDF and "Rethinking" compare budgets with.

Shared by compress/spdf.py (sparse pre-training, dense fine-tuning) and compress/rethinking.py
(scratch training vs fine-tuning of pruned models): both are claims about what a given training
budget buys, so both need the same loop and the same count of what a step costs.

FLOPs: a forward pass costs 2 FLOPs (multiply + add) per *kept* weight of each Linear, and per kept
weight and output position of each Conv; a training step costs 3x its forward pass (forward, gradient
w.r.t. the input, gradient w.r.t. the weights: the accounting of the SPDF paper and Kaplan et al.).
Biases, normalization and activations are left out: they are a rounding error next to the matmuls.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from .masks import MaskKeeper


@dataclass
class Recipe:
    """One training phase: ``epochs`` passes over the data in seeded mini-batches."""

    epochs: int
    lr: float
    optimizer: str = "sgd"  # "sgd" (momentum, coupled weight decay) or "adamw" (decoupled weight decay)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 64
    milestones: Sequence[float] = field(default_factory=tuple)  # lr x0.1 at these shares of the epochs

    def __post_init__(self):
        if self.epochs < 0 or self.lr <= 0 or self.batch_size < 1:
            raise ConfigError(f"a training phase needs epochs >= 0, lr > 0 and batch_size >= 1; got epochs="
                              f"{self.epochs}, lr={self.lr}, batch_size={self.batch_size}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum,
                               weight_decay=self.weight_decay)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: Recipe, seed: int = 0,
          masks: dict[str, torch.Tensor] | None = None) -> int:
    """Train ``model`` in place; with ``masks`` the masked weights stay exactly 0 (MaskKeeper: gradients
    zeroed before the optimizer sees them, weights re-zeroed after each step). Returns the optimizer steps."""
    if len(x) != len(y) or len(y) == 0:
        raise ConfigError(f"training data needs as many labels as rows and at least one row; got {len(x)} rows, "
                          f"{len(y)} labels")
    opt = recipe.make_optimizer(model)
    keeper = MaskKeeper(model, masks).attach(opt) if masks is not None else None
    gen = torch.Generator().manual_seed(seed)
    decay_at = {int(round(m * recipe.epochs)) for m in recipe.milestones}
    steps = 0
    model.train()
    try:
        for epoch in range(recipe.epochs):
            if epoch in decay_at and epoch > 0:
                for g in opt.param_groups:
                    g["lr"] *= 0.1
            order = torch.randperm(len(y), generator=gen)
            for start in range(0, len(y), recipe.batch_size):
                idx = order[start:start + recipe.batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
    finally:
        if keeper is not None:
            keeper.release()
    model.eval()
    return steps


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))}


@torch.no_grad()
def forward_flops(model: nn.Module, example: torch.Tensor, masks: dict[str, torch.Tensor] | None = None) -> int:
    """FLOPs of one forward pass of one sample: 2 x kept weights x output positions, summed over the
    Linear/Conv layers (``example``: one input row; masks by parameter name, as MaskKeeper takes them)."""
    layers = weight_layers(model)
    positions: dict[str, int] = {}

    def hook(name):
        def fn(mod, inp, out):
            # one sample in: a Linear runs once per row/token, a Conv once per output position
            width = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
            positions[name] = out.numel() // width
        return fn

    hs = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    was = model.training
    model.eval()
    try:
        model(example[:1])
    finally:
        model.train(was)
        for h in hs:
            h.remove()
    masks = masks or {}
    total = 0
    for n, m in layers.items():
        key = f"{n}.weight"
        kept = int(masks[key].sum()) if key in masks else m.weight.numel()
        total += 2 * kept * positions.get(n, 0)
    return total


def training_flops(model: nn.Module, example: torch.Tensor, samples: int,
                   masks: dict[str, torch.Tensor] | None = None) -> int:
    """3 x forward FLOPs x samples seen (epochs x dataset rows)."""
    return 3 * forward_flops(model, example, masks) * samples
