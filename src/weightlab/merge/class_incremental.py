"""The class-incremental protocol of Weight Aligning (Zhao et al., CVPR 2020), around `weight_align`.

Classes arrive in tasks (a fixed, seeded class order). For each task the network's classifier grows by
the new classes and is trained on the new classes' data plus an exemplar memory of the old ones, with
loss (1 - lam) CE + lam KD, lam = C_old / C_total, KD = distillation of the previous model's old-class
logits at temperature T = 2 (PyCIL's form: -sum softmax(old/T) log softmax(new[:, :C_old]/T) / batch).
After training, Weight Aligning rescales the new classes' FC rows to the old classes' mean norm. The
memory is a fixed budget (the paper: 2000 exemplars) split evenly over the seen classes, chosen by
iCaRL herding on L2-normalised features and shrunk by keeping each class's herding prefix.

Accuracy is reported on the test samples of all seen classes, and separately on old and new classes,
before and after the alignment (the same trained network, so the difference is WA's alone).
The registered method is the alignment itself (merge/weight-align); this module is the training protocol.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..registry import MethodConfig
from .weight_align import weight_align

PAPER = "Maintaining Discrimination and Fairness in Class Incremental Learning (Zhao et al., 2020)"


class ClassIncrementalConfig(MethodConfig):
    """Paper defaults where they carry over: T = 2, lam = C_old / C_total, 2000-exemplar herding memory
    (scale `memory` to the dataset), SGD momentum 0.9. lr/epochs/wd are for small MLPs on the zoo data."""

    tasks: int = Field(5, ge=2, description="number of tasks (the classes are split evenly)")
    memory: int = Field(2000, ge=0, description="total exemplar budget, split evenly over seen classes")
    temperature: float = Field(2.0, gt=0, description="KD temperature T")
    kd: bool = Field(True, description="distil the previous model's old-class logits")
    loss_weights: Literal["paper", "pycil"] = Field(
        "paper", description="paper: (1 - lam) CE + lam KD, lam = C_old / C_total; pycil: CE + 2 KD (PyCIL's wa.py)")
    align: bool = Field(True, description="Weight Aligning after each incremental task")
    clip_nonnegative: bool = Field(False, description="clip FC weights >= 0 after each step (paper; PyCIL omits)")
    fc_bias: bool = Field(True, description="classifier bias (PyCIL keeps one; WA never rescales it)")
    epochs: int = Field(30, ge=1)
    lr: float = Field(0.05, gt=0)
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(2e-4, ge=0)
    class_order_seed: int | None = Field(1993, description="shuffle the class order (PyCIL's seed); None = 0..C-1")
    seed: int = 0


class IncrementalNet(nn.Module):
    """backbone -> features -> a linear classifier that grows by new classes (old rows kept)."""

    def __init__(self, backbone: nn.Module, feat_dim: int, bias: bool = True):
        super().__init__()
        self.backbone, self.feat_dim, self.bias, self.fc = backbone, feat_dim, bias, None

    def add_classes(self, n: int) -> None:
        old = self.fc
        fc = nn.Linear(self.feat_dim, (0 if old is None else old.out_features) + n, bias=self.bias)
        if old is not None:
            with torch.no_grad():
                fc.weight[:old.out_features] = old.weight
                if self.bias:
                    fc.bias[:old.out_features] = old.bias
        self.fc = fc

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def mlp_backbone(in_features: int, hidden: Sequence[int] = (128, 128)) -> tuple[nn.Module, int]:
    layers, width = [], in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers), width


def kd_loss(logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """-sum_k softmax(old/T)_k log softmax(new/T)_k, averaged over the batch (no T^2 factor, as PyCIL)."""
    soft = torch.softmax(old_logits / temperature, dim=1)
    return -(soft * torch.log_softmax(logits / temperature, dim=1)).sum() / logits.shape[0]


def herding(features: torch.Tensor, m: int) -> list[int]:
    """iCaRL herding: m indices (in selection order) whose running mean best tracks the mean feature."""
    mu = features.mean(0)
    chosen: list[int] = []
    total = torch.zeros_like(mu)
    avail = torch.ones(len(features), dtype=torch.bool)
    for k in range(1, min(m, len(features)) + 1):
        dist = ((mu - (total + features) / k) ** 2).sum(1)
        dist[~avail] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        avail[i] = False
        total = total + features[i]
    return chosen


def task_splits(num_classes: int, tasks: int, order_seed: int | None) -> list[list[int]]:
    if tasks > num_classes:
        raise ConfigError(f"{tasks} tasks need at least {tasks} classes; the data has {num_classes}")
    order = list(range(num_classes)) if order_seed is None else \
        torch.randperm(num_classes, generator=torch.Generator().manual_seed(order_seed)).tolist()
    bounds = [round(i * num_classes / tasks) for i in range(tasks + 1)]
    return [order[bounds[i]:bounds[i + 1]] for i in range(tasks)]


@torch.no_grad()
def _accuracy(net: IncrementalNet, x: torch.Tensor, y: torch.Tensor, old: int) -> dict:
    pred = net(x).argmax(1)
    ok = (pred == y).double()
    is_old = y < old
    return {"all": float(ok.mean()), "old": float(ok[is_old].mean()) if is_old.any() else None,
            "new": float(ok[~is_old].mean()),
            "pred_new_fraction": float((pred >= old).double().mean())}


def _norms(net: IncrementalNet, old: int) -> dict:
    n = net.fc.weight.detach().norm(dim=1)
    return {"old": float(n[:old].mean()) if old else None, "new": float(n[old:].mean())}


def run_class_incremental(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                          cfg: ClassIncrementalConfig | None = None,
                          backbone_fn: Callable[[int], tuple[nn.Module, int]] | None = None, **params) -> dict:
    """Run the protocol; returns {"class_order", "tasks": [per-task record], "model"}.

    Labels are remapped to class-order positions (class order[j] -> j), so the old classes are always the
    first C_old rows of the classifier. A record holds the task's classes, lam, memory per class, the
    exemplar count, gamma, FC row norms before/after WA and test accuracy (all/old/new) before/after WA."""
    cfg = cfg if cfg is not None else ClassIncrementalConfig(**params)
    if x_train.shape[0] != y_train.shape[0] or x_test.shape[0] != y_test.shape[0]:
        raise ConfigError("inputs and labels differ in length (train or test)")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    splits = task_splits(num_classes, cfg.tasks, cfg.class_order_seed)
    order = [c for s in splits for c in s]
    remap = torch.empty(num_classes, dtype=torch.long)
    remap[torch.tensor(order)] = torch.arange(num_classes)
    ytr, yte = remap[y_train], remap[y_test]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        backbone, feat_dim = (backbone_fn or (lambda seed: mlp_backbone(x_train[0].numel())))(cfg.seed)
        net = IncrementalNet(backbone, feat_dim, cfg.fc_bias)
    gen = torch.Generator().manual_seed(cfg.seed)
    memory: dict[int, torch.Tensor] = {}  # class position -> train indices in herding order
    records, old_net, seen = [], None, 0
    for t, split in enumerate(splits):
        new = len(split)
        total = seen + new
        net.add_classes(new)
        task_idx = torch.nonzero((ytr >= seen) & (ytr < total)).flatten()
        mem_idx = torch.cat(list(memory.values())) if memory else torch.empty(0, dtype=torch.long)
        idx = torch.cat([task_idx, mem_idx])
        lam = seen / total
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        net.train()
        for _ in range(cfg.epochs):
            perm = idx[torch.randperm(len(idx), generator=gen)]
            for s in range(0, len(perm), cfg.batch_size):
                b = perm[s:s + cfg.batch_size]
                logits = net(x_train[b])
                loss = F.cross_entropy(logits, ytr[b])
                if old_net is not None and cfg.kd:
                    with torch.no_grad():
                        old_logits = old_net(x_train[b])
                    kd = kd_loss(logits[:, :seen], old_logits, cfg.temperature)
                    loss = (1 - lam) * loss + lam * kd if cfg.loss_weights == "paper" else loss + 2 * kd
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if cfg.clip_nonnegative:
                    with torch.no_grad():
                        net.fc.weight.clamp_(min=0)
        net.eval()
        test_mask = yte < total
        xt, yt = x_test[test_mask], yte[test_mask]
        rec = {"task": t, "classes": [order[j] for j in range(seen, total)], "old_classes": seen,
               "lam": lam, "train_samples": len(idx), "exemplars": len(mem_idx),
               "acc_before_wa": _accuracy(net, xt, yt, seen), "norms_before_wa": _norms(net, seen), "gamma": None}
        if t > 0 and cfg.align:
            with torch.no_grad():
                w, gamma = weight_align(net.fc.weight.detach(), seen)
                net.fc.weight.copy_(w)
            rec["gamma"] = gamma
        rec["acc"] = _accuracy(net, xt, yt, seen)
        rec["norms"] = _norms(net, seen)
        # exemplar memory: fixed budget split over the seen classes; old classes keep their herding prefix
        per_class = cfg.memory // total
        rec["memory_per_class"] = per_class
        with torch.no_grad():
            for c in range(seen, total):
                ci = torch.nonzero(ytr == c).flatten()
                feats = F.normalize(net.features(x_train[ci]), dim=1)
                memory[c] = ci[torch.tensor(herding(feats, per_class), dtype=torch.long)]
        for c in range(total):
            memory[c] = memory[c][:per_class]
        rec["memory_total"] = sum(len(v) for v in memory.values())
        records.append(rec)
        old_net = copy.deepcopy(net).eval()
        for p in old_net.parameters():
            p.requires_grad_(False)
        seen = total
    return {"class_order": order, "tasks": records, "model": net,
            "memory": {order[c]: v.clone() for c, v in memory.items()}}  # original class id -> train indices
