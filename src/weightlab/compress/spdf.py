"""SPDF: sparse pre-training, then dense fine-tuning (Thangarasa et al., UAI 2023).

Pre-training: a static unstructured mask, random at initialization with the same sparsity in every
layer, holds the masked weights at exactly 0 (no gradient, no optimizer-state change, no weight decay:
MaskKeeper). Fine-tuning: the mask is released; the previously masked weights start at 0 and train
with the rest (dense), with a fresh optimizer for the downstream task. The paper's point is the budget:
at 75% sparsity the pre-training matmuls cost about a quarter, and the downstream accuracy after
dense fine-tuning stays close to dense pre-training.

Which layers: the paper sparsifies the transformer blocks' linears and keeps the embeddings, norms and
biases dense; on a plain MLP/CNN we sparsify every weight matrix but the output head (the analogue of
the tied embedding/LM head). ``layers`` picks others.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from .sparse_train import Recipe, train, training_flops, weight_layers

PAPER = "SPDF: Sparse Pre-training and Dense Fine-tuning for Large Language Models (Thangarasa et al., UAI 2023)"


class SPDFConfig(MethodConfig):
    sparsity: float = Field(0.75, ge=0, lt=1, description="share of each sparsified weight matrix held at 0 "
                                                          "in pre-training (paper: 50-75%)")
    pretrain_epochs: int = Field(20, ge=1, description="sparse pre-training epochs")
    finetune_epochs: int = Field(10, ge=0, description="dense fine-tuning epochs (mask released)")
    lr: float = Field(3e-3, gt=0, description="pre-training learning rate (AdamW)")
    finetune_lr: float = Field(1e-3, gt=0, description="fine-tuning learning rate (AdamW, fresh state)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay (GPT-3 recipe: 0.1)")
    batch_size: int = Field(64, ge=1)
    dense_head: bool = Field(True, description="keep the last weight layer (output head) dense, like the "
                                               "paper's dense embeddings")
    layers: list[str] | None = Field(None, description="module names to sparsify (default: every Linear/Conv "
                                                       "but the head)")
    seed: int = Field(0, description="mask and batch order")

    def pretrain_recipe(self) -> Recipe:
        return Recipe(self.pretrain_epochs, self.lr, "adamw", weight_decay=self.weight_decay,
                      batch_size=self.batch_size)

    def finetune_recipe(self) -> Recipe:
        return Recipe(self.finetune_epochs, self.finetune_lr, "adamw", weight_decay=self.weight_decay,
                      batch_size=self.batch_size)


def sparsified_layers(model: nn.Module, layers: list[str] | None = None, dense_head: bool = True) -> list[str]:
    """Module names whose weights SPDF masks."""
    found = weight_layers(model)
    if layers is not None:
        unknown = [n for n in layers if n not in found]
        if unknown:
            raise ConfigError(f"SPDF layers {unknown[:3]} are not Linear/Conv modules of the model; it has "
                              f"{list(found)[:8]}")
        return list(layers)
    names = list(found)
    return names[:-1] if dense_head and len(names) > 1 else names


def random_masks(model: nn.Module, sparsity: float, layers: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """Keep-masks with exactly round((1 - sparsity) * n) kept entries per layer, chosen uniformly at random."""
    gen = torch.Generator().manual_seed(seed)
    mods = weight_layers(model)
    out = {}
    for n in layers:
        w = mods[n].weight
        keep = int(round((1 - sparsity) * w.numel()))
        flat = torch.zeros(w.numel(), dtype=torch.bool)
        flat[torch.randperm(w.numel(), generator=gen)[:keep]] = True
        out[f"{n}.weight"] = flat.reshape(w.shape)
    return out


@dataclass
class SPDFResult:
    model: nn.Module
    masks: dict[str, torch.Tensor]
    pretrain_steps: int
    finetune_steps: int
    pretrain_flops: int  # sparse pre-training, by the 3 x forward rule on kept weights
    dense_pretrain_flops: int  # the same epochs with every weight trained
    finetune_flops: int
    masked_nonzero_at_switch: int  # masked weights not exactly 0 when the mask is released: must be 0
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def flop_reduction(self) -> float:
        return self.dense_pretrain_flops / self.pretrain_flops if self.pretrain_flops else float("inf")

    def as_dict(self) -> dict[str, Any]:
        total = sum(m.numel() for m in self.masks.values())
        return {"sparsity": 1 - sum(int(m.sum()) for m in self.masks.values()) / total if total else 0.0,
                "sparsified_layers": [n.removesuffix(".weight") for n in self.masks],
                "pretrain_steps": self.pretrain_steps, "finetune_steps": self.finetune_steps,
                "pretrain_flops": self.pretrain_flops, "dense_pretrain_flops": self.dense_pretrain_flops,
                "pretrain_flop_reduction": round(self.flop_reduction, 4), "finetune_flops": self.finetune_flops,
                "masked_nonzero_at_switch": self.masked_nonzero_at_switch, "seconds": self.seconds}


def equal_flops_epochs(model: nn.Module, masks: dict[str, torch.Tensor], example: torch.Tensor,
                       sparse_epochs: int) -> float:
    """Dense pre-training epochs that cost what ``sparse_epochs`` of sparse pre-training cost."""
    sparse = training_flops(model, example, 1, masks)
    dense = training_flops(model, example, 1)
    return sparse_epochs * sparse / dense


def _xy(data, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(data, "x_train"):
        return data.x_train, data.y_train
    try:
        x, y = data
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a zoo Dataset or an (x, y) pair of tensors") from None
    return x, y


@register("compress", "spdf", kind="whole", config=SPDFConfig, regime=Regime.WHOLE_MODEL, paper=PAPER,
          summary="sparse pre-training with a static random mask, then release it and fine-tune dense")
def spdf(model: nn.Module, pretrain_data: Any, finetune_data: Any | None = None, cfg: SPDFConfig | None = None,
         **params) -> SPDFResult:
    """Pre-train ``model`` in place with a static random mask, release it, fine-tune densely.

    ``pretrain_data`` / ``finetune_data``: zoo Datasets or (x, y) pairs; finetune_data=None skips the dense
    phase (a sparse pre-trained model whose zeros are the mask)."""
    cfg = cfg or SPDFConfig(**params)
    px, py = _xy(pretrain_data, "pretrain_data")
    fx, fy = _xy(finetune_data, "finetune_data") if finetune_data is not None else (None, None)
    names = sparsified_layers(model, cfg.layers, cfg.dense_head)
    masks = random_masks(model, cfg.sparsity, names, cfg.seed)
    pre, ft = cfg.pretrain_recipe(), cfg.finetune_recipe()  # checked before any training
    seconds = {}
    t0 = time.perf_counter()
    pre_steps = train(model, px, py, pre, seed=cfg.seed, masks=masks)  # MaskKeeper applies the mask first
    seconds["pretrain"] = time.perf_counter() - t0
    example = px[:1]
    # the release: train() has dropped the MaskKeeper; the masked weights are 0 and now trainable
    params = dict(model.named_parameters())
    switch = sum(int((params[n].detach()[~m] != 0).sum()) for n, m in masks.items())
    ft_steps, ft_flops = 0, 0
    if fx is not None and cfg.finetune_epochs > 0:
        t0 = time.perf_counter()
        ft_steps = train(model, fx, fy, ft, seed=cfg.seed + 1)
        seconds["finetune"] = time.perf_counter() - t0
        ft_flops = training_flops(model, example, cfg.finetune_epochs * len(fy))
    samples = cfg.pretrain_epochs * len(py)
    return SPDFResult(model, masks, pre_steps, ft_steps, training_flops(model, example, samples, masks),
                      training_flops(model, example, samples), ft_flops, switch, seconds)
