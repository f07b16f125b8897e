"""Keep pruned weights at zero during later training; release them for a dense phase (SPDF).

SPDF (Thangarasa et al., "Sparse Pre-training and Dense Fine-tuning for Large Language
Models", 2023): train sparse, then release the mask and fine-tune densely. The method itself (random
static masks, the two phases, FLOP accounting) is compress/spdf.py; these are its building blocks for
your own training loop.
"""
from __future__ import annotations

import torch
from torch import nn


def masks_from_zeros(model: nn.Module, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Keep-masks (True = trainable) for each weight, from its current zeros."""
    out = {}
    for n, p in model.named_parameters():
        if n.endswith("weight") and p.dim() >= 2 and (names is None or n.removesuffix(".weight") in names):
            out[n] = p.detach() != 0
    return out


class MaskKeeper:
    """Zero masked gradients (so optimizer state never moves them) and re-zero weights after each step.

    keeper = MaskKeeper(model).attach(optimizer); ... train ...; keeper.release()  # SPDF dense phase
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor] | None = None):
        self.model = model
        self.masks = masks if masks is not None else masks_from_zeros(model)
        params = dict(model.named_parameters())
        unknown = [n for n in self.masks if n not in params]
        if unknown:
            raise KeyError(f"masks name parameters the model lacks: {unknown[:5]}")
        self.params = {n: params[n] for n in self.masks}
        self._handles: list = []
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for n, p in self.params.items():
            p.mul_(self.masks[n].to(p.dtype))

    def attach(self, optimizer: torch.optim.Optimizer) -> "MaskKeeper":
        for n, p in self.params.items():
            m = self.masks[n]
            self._handles.append(p.register_hook(lambda g, m=m: g * m.to(g.dtype)))
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.apply()))
        return self

    def release(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return 1 - sum(int(m.sum()) for m in self.masks.values()) / total if total else 0.0


class SPDFSchedule:
    """Sparse for `sparse_steps` optimizer steps, then dense: call step() after each optimizer step."""

    def __init__(self, keeper: MaskKeeper, sparse_steps: int):
        self.keeper, self.sparse_steps, self.steps = keeper, sparse_steps, 0

    def step(self) -> bool:
        self.steps += 1
        if self.steps == self.sparse_steps:
            self.keeper.release()
        return self.steps >= self.sparse_steps  # True once dense
