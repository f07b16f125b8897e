"""The protocol of "Rethinking the Value of Network Pruning" (Liu et al., ICLR 2019).

Train a large model, prune it, and compare fine-tuning the pruned model (inherited weights) with
training the *pruned architecture* from a fresh random init:
- Scratch-E: the same epochs as the large model's training, the same recipe;
- Scratch-B: the same training FLOPs as the large model: epochs x FLOPs(large) / FLOPs(pruned)
  (the anchor's CIFAR code: int(160 * flops_std / flops_small), no cap; the ImageNet runs capped the
  extension at 2x: ``max_epoch_factor``).
Two kinds of pruned architecture: structured (L1-norm channel pruning, Li et al. 2017, the first of the
paper's methods: the smaller network is built with fewer hidden units / channels) and unstructured
(global magnitude masks, Han et al. 2015: the architecture is the mask, held during training).
Anchor recipe (CIFAR, l1-norm-pruning): SGD lr 0.1, momentum 0.9, wd 1e-4, lr x0.1 at 50% and 75% of
the epochs; fine-tuning 40 epochs (a quarter of 160) at the schedule's last lr 0.001.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from .masks import masks_from_zeros
from .sparse_train import Recipe, train, training_flops

PAPER = "Rethinking the Value of Network Pruning (Liu et al., ICLR 2019)"


class RethinkingConfig(MethodConfig):
    structure: Literal["channels", "weights"] = Field("channels", description="channels: L1-norm channel "
                                                      "pruning (a smaller network); weights: global magnitude masks")
    ratio: float = Field(0.5, gt=0, lt=1, description="share of hidden channels/units (channels) or of weights "
                                                      "(weights) pruned")
    budget: Literal["E", "B"] = Field("E", description="Scratch-E: the large model's epochs; Scratch-B: its FLOPs")
    epochs: int = Field(40, ge=1, description="the large model's training epochs (E); anchor: 160 on CIFAR")
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(64, ge=1)
    finetune_epochs: int | None = Field(None, ge=0, description="fine-tuning epochs (default epochs/4, the "
                                                                "anchor's 40 of 160)")
    finetune_lr: float = Field(1e-3, gt=0, description="fine-tuning lr: the schedule's last (anchor 0.001)")
    max_epoch_factor: float | None = Field(None, gt=1, description="cap on Scratch-B's epoch extension "
                                                                   "(paper's ImageNet runs: 2)")
    seed: int = Field(0, description="fresh initialization and batch order of the scratch run")

    def recipe(self, epochs: int) -> Recipe:
        return Recipe(epochs, self.lr, "sgd", self.momentum, self.weight_decay, self.batch_size, (0.5, 0.75))

    def finetune_recipe(self, epochs: int | None = None) -> Recipe:
        e = epochs if epochs is not None else (self.finetune_epochs if self.finetune_epochs is not None
                                               else max(1, self.epochs // 4))
        return Recipe(e, self.finetune_lr, "sgd", self.momentum, self.weight_decay, self.batch_size)


# --- structured: L1-norm channel pruning into a genuinely smaller network ---------------------------------

def _keep(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices (ascending) of the round((1 - ratio) * n) largest scores, at least one."""
    k = max(1, int(round((1 - ratio) * scores.numel())))
    return torch.topk(scores, k).indices.sort().values


@torch.no_grad()
def prune_channels(model: nn.Module, ratio: float) -> nn.Module:
    """A new, smaller zoo MLP / SmallCNN keeping the hidden units / conv filters of largest L1 norm in each
    layer (output head intact), with the kept weights copied in. The input model is not modified."""
    from ..zoo.classifiers import MLP, SmallCNN

    if not 0 < ratio < 1:
        raise ConfigError(f"channel pruning ratio must be in (0, 1), got {ratio}")
    if isinstance(model, MLP):
        lins = [m for m in model.body if isinstance(m, nn.Linear)]
        keeps = [_keep(lin.weight.abs().sum(1), ratio) for lin in lins[:-1]]
        small = MLP(lins[0].in_features, tuple(len(k) for k in keeps), lins[-1].out_features)
        new = [m for m in small.body if isinstance(m, nn.Linear)]
        prev = None
        for i, (old, nw) in enumerate(zip(lins, new)):
            w = old.weight if prev is None else old.weight[:, prev]
            rows = keeps[i] if i < len(keeps) else torch.arange(old.out_features)
            nw.weight.copy_(w[rows])
            nw.bias.copy_(old.bias[rows])
            prev = rows
        return small.eval()
    if isinstance(model, SmallCNN):
        convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
        bns = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
        keeps = [_keep(c.weight.abs().sum((1, 2, 3)), ratio) for c in convs]
        small = SmallCNN(model.head.out_features, tuple(len(k) for k in keeps), model.side)
        sc = [m for m in small.features if isinstance(m, nn.Conv2d)]
        sb = [m for m in small.features if isinstance(m, nn.BatchNorm2d)]
        prev = None
        for old, nw, ob, nb, rows in zip(convs, sc, bns, sb, keeps):
            w = old.weight if prev is None else old.weight[:, prev]
            nw.weight.copy_(w[rows])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(nb, name).copy_(getattr(ob, name)[rows])
            nb.num_batches_tracked.copy_(ob.num_batches_tracked)
            prev = rows
        # the head reads the 2x2-pooled map flattened channel-major: channel c owns columns 4c..4c+3
        cols = (prev[:, None] * 4 + torch.arange(4)).reshape(-1)
        small.head.weight.copy_(model.head.weight[:, cols])
        small.head.bias.copy_(model.head.bias)
        return small.eval()
    raise ConfigError(f"structured (channel) pruning builds smaller zoo MLP and SmallCNN models; got "
                      f"{type(model).__name__}. Use structure='weights' (masks) for other models")


def fresh_like(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture with every parameter and buffer re-initialized (seeded), sharing nothing."""
    new = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in new.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
    stale = [n for (n, p), q in zip(model.named_parameters(), new.parameters()) if p.numel() > 1 and torch.equal(p, q)]
    if stale:
        raise ConfigError(f"cannot re-initialize {stale[:3]}: their modules have no reset_parameters(); scratch "
                          "training needs a fresh init of every weight")
    return new.train()


# --- unstructured: global magnitude masks --------------------------------------------------------------

@torch.no_grad()
def magnitude_masks(model: nn.Module, ratio: float) -> dict[str, torch.Tensor]:
    """Keep-masks removing the ``ratio`` share of all Linear/Conv weights of smallest |w| (one global threshold)."""
    ws = {n: p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() >= 2}
    flat = torch.cat([w.abs().reshape(-1) for w in ws.values()])
    k = int(ratio * flat.numel())
    if k == 0:
        return {n: torch.ones_like(w, dtype=torch.bool) for n, w in ws.items()}
    thr = torch.kthvalue(flat, k).values
    return {n: w.abs() > thr for n, w in ws.items()}


def reinitialize_pruned(model: nn.Module, masks: dict[str, torch.Tensor] | None = None, seed: int = 0) -> dict:
    """Re-initialize all parameters in place (each module's reset_parameters) and re-apply the masks."""
    masks = masks if masks is not None else masks_from_zeros(model)
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, mk in masks.items():
            params[n].mul_(mk.to(params[n].dtype))
    return masks


# --- the protocol ----------------------------------------------------------------------------------------

def scratch_epochs(cfg: RethinkingConfig, large: nn.Module, small: nn.Module, example: torch.Tensor,
                   masks: dict[str, torch.Tensor] | None = None) -> int:
    """Scratch-E: cfg.epochs. Scratch-B: int(epochs x FLOPs(large) / FLOPs(pruned)), capped by max_epoch_factor."""
    if cfg.budget == "E":
        return cfg.epochs
    factor = training_flops(large, example, 1) / training_flops(small, example, 1, masks)
    if cfg.max_epoch_factor is not None:
        factor = min(factor, cfg.max_epoch_factor)
    return int(cfg.epochs * factor)


@dataclass
class ScratchResult:
    model: nn.Module
    epochs: int
    steps: int
    flops: int  # training FLOPs spent (3 x forward x samples, kept weights only)
    budget: str
    masks: dict[str, torch.Tensor] | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "epochs": self.epochs, "steps": self.steps, "flops": self.flops,
                "params": sum(p.numel() for p in self.model.parameters()),
                "kept_weights": None if self.masks is None else sum(int(m.sum()) for m in self.masks.values()),
                "seconds": round(self.seconds, 3), **self.extra}


@register("compress", "scratch", kind="whole", config=RethinkingConfig, regime=Regime.WHOLE_MODEL, paper=PAPER,
          summary="train the pruned architecture from a fresh init (Scratch-E: same epochs; Scratch-B: same FLOPs)")
def train_from_scratch(pruned: nn.Module, data: Any, cfg: RethinkingConfig | None = None, *,
                       large: nn.Module | None = None, masks: dict[str, torch.Tensor] | None = None,
                       **params) -> ScratchResult:
    """Train a freshly initialized copy of ``pruned``'s architecture (its weights are not used) on ``data``
    (a zoo Dataset). ``masks`` (unstructured) are held through training. Scratch-B needs ``large``."""
    cfg = cfg or RethinkingConfig(**params)
    if cfg.budget == "B" and large is None:
        raise ConfigError("Scratch-B trains for the large model's FLOPs: pass the unpruned model as large=")
    x, y = data.x_train, data.y_train
    epochs = scratch_epochs(cfg, large, pruned, x[:1], masks) if cfg.budget == "B" else cfg.epochs
    model = fresh_like(pruned, cfg.seed)
    t0 = time.perf_counter()
    steps = train(model, x, y, cfg.recipe(epochs), seed=cfg.seed, masks=masks)
    return ScratchResult(model, epochs, steps, training_flops(model, x[:1], epochs * len(y), masks),
                         f"Scratch-{cfg.budget}", masks, time.perf_counter() - t0)


def finetune(pruned: nn.Module, data: Any, cfg: RethinkingConfig, epochs: int | None = None,
             masks: dict[str, torch.Tensor] | None = None) -> ScratchResult:
    """Fine-tune a copy of the pruned model (inherited weights) at the fine-tuning lr; masks held."""
    model = copy.deepcopy(pruned)
    rec = cfg.finetune_recipe(epochs)
    x, y = data.x_train, data.y_train
    t0 = time.perf_counter()
    steps = train(model, x, y, rec, seed=cfg.seed, masks=masks)
    return ScratchResult(model, rec.epochs, steps, training_flops(model, x[:1], rec.epochs * len(y), masks),
                         f"fine-tune-{rec.epochs}", masks, time.perf_counter() - t0)


def prune_for(model: nn.Module, cfg: RethinkingConfig) -> tuple[nn.Module, dict | None]:
    """(pruned model with inherited weights, masks or None): the pruned architecture of cfg.structure."""
    if cfg.structure == "channels":
        return prune_channels(model, cfg.ratio), None
    masks = magnitude_masks(model, cfg.ratio)
    pruned = copy.deepcopy(model)
    params = dict(pruned.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m.to(params[n].dtype))
    return pruned.eval(), masks
