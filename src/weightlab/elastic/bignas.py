"""BigNAS (Yu et al., ECCV 2020): one set of shared weights whose children need no retraining.

Each step on one batch (the sandwich rule): the largest child is trained on the labels (label smoothing,
dropout: the only regularized child), then ``num_random`` random children and the smallest child are trained on
the largest child's detached soft predictions (in-place distillation, soft cross-entropy at T = 1); their
gradients accumulate and one optimizer step follows. Weight decay is the optimizer's, applied once per step
(so it is "on the largest child only", which covers every weight; a per-child L2 term would decay the shared
leading slices several times). Init: gamma = 0 in the last BN of every residual block. LR: linear warmup, then
lr0 * rate ** ((epoch - warmup) / decay_epochs), never below ``lr_floor`` * lr0 ("exponential decay with a
constant ending"; rate 0.97 per 2.4 epochs in the paper's ImageNet run; here decay_epochs defaults to the
value that reaches the floor at 70% of training, because CPU runs are ~10x shorter). After training, BN
statistics are recalibrated per child (``calibrate``) before it is evaluated or exported.

net="lm" (a char-level decoder-only transformer on the text zoo, ``bignas_lm.py``): the same step on
next-character targets (every position is one sample; the soft targets are the largest child's per-position
distributions). It has no BN, so calibration is a no-op; its own defaults (``LM_DEFAULTS``, used where a field is
not given) are AdamW (lr 3e-3, weight decay 0.01), no label smoothing, dropout 0.1, 12 epochs, warmup 0.5 epoch.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..engine.result import Result
from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from .bignas_nets import Child, ElasticCNN, ElasticMLP, ElasticNet

LM_DEFAULTS = {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.01, "label_smoothing": 0.0, "dropout": 0.1,
               "epochs": 12, "warmup_epochs": 0.5}

PAPER = ("BigNAS: Scaling Up Neural Architecture Search with Big Single-Stage Models (Yu et al., ECCV 2020, "
         "arXiv 2003.11142)")


class BigNASConfig(MethodConfig):
    """Paper rules at CPU scale: sandwich with 2 random children, in-place KD at T=1, label smoothing 0.1 and
    dropout 0.2 on the largest child only, wd once per step, exp decay 0.97 to a 5% floor after warmup."""

    net: Literal["mlp", "cnn", "lm"] = "cnn"
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(64, ge=2)
    optimizer: Literal["sgd", "rmsprop", "adamw"] = "sgd"  # paper: RMSProp; public BigNAS-style code: SGD
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-5, ge=0)
    warmup_epochs: float = Field(2.0, ge=0)
    decay_rate: float = Field(0.97, gt=0, lt=1)
    decay_epochs: float | None = Field(None, gt=0)  # None: reach the floor at floor_at of training
    floor_at: float = Field(0.7, gt=0, le=1)
    lr_floor: float = Field(0.05, gt=0, le=1)
    num_random: int = Field(2, ge=0)
    inplace_kd: bool = True  # False: every child is trained on the labels (ablation)
    teacher_forward: Literal["same", "clean"] = "same"  # soft targets from the dropout forward, or a clean one
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    calib_batches: int = Field(64, ge=1)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _lm_defaults(cls, data):
        """A transformer trains badly with the CNN recipe (SGD lr 0.05, label smoothing): net="lm" fills the
        fields not given from LM_DEFAULTS."""
        if isinstance(data, dict) and data.get("net") == "lm":
            data = {**LM_DEFAULTS, **data}
        return data

    @model_validator(mode="after")
    def _schedule_fits(self):
        if self.decay_epochs is None and self.floor_at * self.epochs <= self.warmup_epochs:
            raise ValueError(f"floor_at * epochs ({self.floor_at * self.epochs:g}) must exceed warmup_epochs "
                             f"({self.warmup_epochs:g}), or give decay_epochs")
        return self


def decay_every(cfg: BigNASConfig) -> float:
    """Epochs per factor `decay_rate` (given, or the value that reaches the floor at floor_at of training)."""
    if cfg.decay_epochs is not None:
        return cfg.decay_epochs
    return (cfg.floor_at * cfg.epochs - cfg.warmup_epochs) / (math.log(cfg.lr_floor) / math.log(cfg.decay_rate))


def floor_epoch(cfg: BigNASConfig) -> float:
    """The epoch at which the decay reaches lr_floor * lr (closed form)."""
    return cfg.warmup_epochs + decay_every(cfg) * math.log(cfg.lr_floor) / math.log(cfg.decay_rate)


def bignas_lr(epoch: float, cfg: BigNASConfig) -> float:
    """Learning rate at fractional `epoch`: linear warmup to lr, then exponential decay with a constant floor."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * epoch / cfg.warmup_epochs
    return max(cfg.lr * cfg.decay_rate ** ((epoch - cfg.warmup_epochs) / decay_every(cfg)), cfg.lr_floor * cfg.lr)


def make_supernet(cfg: BigNASConfig, num_features: int, num_classes: int) -> ElasticNet:
    """The supernet for a dataset of `num_features` inputs: 8x8 images (64) or 1-D sequences for the CNN."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.net == "mlp":
            return ElasticMLP(num_features, num_classes, dropout=cfg.dropout)
        if cfg.net == "lm":  # num_features: the context length of the windows; num_classes: the vocabulary
            from .bignas_lm import ElasticLM

            return ElasticLM(num_classes, num_features, dropout=cfg.dropout)
        side = math.isqrt(num_features)
        if side * side == num_features and side <= 16:
            return ElasticCNN(num_classes, 2, side, dropout=cfg.dropout)
        return ElasticCNN(num_classes, 1, num_features, dropout=cfg.dropout)


def soft_ce(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """-sum_j p_j log softmax(logits)_j, mean over the batch (KL to the teacher up to a constant)."""
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(1).mean()


@contextlib.contextmanager
def _no_dropout(net: ElasticNet):
    p = net.dropout.p
    net.dropout.p = 0.0
    try:
        yield
    finally:
        net.dropout.p = p


def sandwich_step(net: ElasticNet, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  cfg: BigNASConfig, rng: random.Random) -> dict:
    """One BigNAS step: largest child on labels, random + smallest children on its detached soft predictions,
    gradients accumulated, one optimizer step. Returns the children run (in order) and their losses."""
    net.train()
    mx, mn = net.max_child(), net.min_child()
    others = [net.random_child(rng) for _ in range(cfg.num_random)] + [mn]
    opt.zero_grad(set_to_none=True)
    net.set_child(mx)
    flat = (lambda o: o.flatten(0, -2)) if y.dim() > 1 else (lambda o: o)  # LM: every position is a sample
    y = y.reshape(-1)
    out = flat(net(x))
    loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
    loss.backward()
    if cfg.teacher_forward == "clean":
        with torch.no_grad(), _no_dropout(net):
            out = flat(net(x))
    teacher = F.softmax(out.detach(), dim=1)
    losses = [loss.item()]
    for c in others:
        net.set_child(c)
        o = flat(net(x))
        la = soft_ce(o, teacher) if cfg.inplace_kd else F.cross_entropy(o, y)
        la.backward()
        losses.append(la.item())
    opt.step()
    net.set_child(mx)
    return {"children": [mx] + others, "losses": losses, "teacher": teacher}


def make_optimizer(net: ElasticNet, cfg: BigNASConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":  # the transformer's optimizer (weight decay decoupled, once per step)
        return torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":  # TF-style RMSProp as in EfficientNet/BigNAS: decay 0.9, eps 1e-3
        return torch.optim.RMSprop(net.parameters(), lr=cfg.lr, alpha=0.9, eps=1e-3, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
    return torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


@torch.no_grad()
def calibrate(net: ElasticNet, child: Child, x: torch.Tensor, batches: int = 64, batch_size: int = 64,
              seed: int = 0) -> None:
    """Recalibrate the BN statistics of `child` on up to `batches` shuffled training batches: running mean and
    variance become the plain average of the per-batch means and unbiased variances (PyTorch's momentum=None
    cumulative average), written into the child's slice of the supernet's buffers."""
    net.set_child(child)
    if not isinstance(net, ElasticCNN):  # no BatchNorm
        net.calibrated = child
        return
    t = net.child_tensors(child)
    acc: dict[str, list] = {}

    def bn(h, p):
        dims = [0] + list(range(2, h.dim()))
        a = acc.setdefault(p, [0.0, 0.0, 0])
        a[0] = a[0] + h.mean(dims)
        a[1] = a[1] + h.var(dims, unbiased=True)
        a[2] += 1
        return F.batch_norm(h, None, None, t[p + ".weight"], t[p + ".bias"], True, 0.0, 1e-5)

    was = net.training
    net.eval()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for b in range(min(batches, max(1, len(x) // batch_size))):
        net(x[order[b * batch_size:(b + 1) * batch_size]], bn=bn)
    for p, (m, v, n) in acc.items():
        t[p + ".running_mean"].copy_(m / n)
        t[p + ".running_var"].copy_(v / n)
    net.calibrated = child
    net.train(was)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Accuracy in eval mode (a supernet evaluates its active child, which must be calibrated)."""
    was = model.training
    model.eval()
    try:
        hits = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                   for i in range(0, len(y), batch_size))
    finally:
        model.train(was)
    return hits / len(y)


@dataclass
class BigNASResult(Result):
    net: ElasticNet
    config: BigNASConfig
    dataset: str
    history: list[dict] = field(default_factory=list)  # per epoch: lr, loss of the largest / smallest child
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"method": "bignas", "dataset": self.dataset, "arch": self.net.arch(), "config":
                self.config.model_dump(), "max_child": self.net.max_child().as_dict(),
                "min_child": self.net.min_child().as_dict(), "history": self.history, "seconds": self.seconds}


@register("elastic", "bignas", paper=PAPER, config=BigNASConfig, regime=Regime.WHOLE_MODEL, kind="whole",
          summary="supernet of sliced children (width, depth, kernel; heads for the char-level transformer) trained "
                  "with the sandwich rule and in-place distillation; children used without retraining, BN "
                  "recalibrated per child")
def train_bignas(data, cfg: BigNASConfig | None = None, *, show_progress: bool | None = None,
                 **params) -> BigNASResult:
    """Train a BigNAS supernet on a zoo dataset name or a ``bignas_io.Split`` (train / val / test)."""
    from ..engine.progress import progress
    from .bignas_io import Split, load_split

    cfg = cfg or BigNASConfig(**params)
    split = data if isinstance(data, Split) else load_split(str(data))
    x, y = split.x_train, split.y_train
    if len(y) < cfg.batch_size:
        raise ConfigError(f"{split.name} has {len(y)} training samples, fewer than batch_size {cfg.batch_size}")
    net = make_supernet(cfg, x.shape[1], split.num_classes)
    opt = make_optimizer(net, cfg)
    rng, gen = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    steps = len(y) // cfg.batch_size  # the last partial batch is dropped (BN needs more than one sample)
    history, t0 = [], time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread is as fast, and results do not depend on the core count
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # dropout masks
            for epoch in progress(range(cfg.epochs), "bignas epochs", enabled=show_progress):
                order = torch.randperm(len(y), generator=gen)
                lmax = lmin = 0.0
                for s in range(steps):
                    for g in opt.param_groups:
                        g["lr"] = bignas_lr(epoch + s / steps, cfg)
                    idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                    out = sandwich_step(net, opt, x[idx], y[idx], cfg, rng)
                    lmax, lmin = lmax + out["losses"][0] / steps, lmin + out["losses"][-1] / steps
                history.append({"epoch": epoch + 1, "lr": bignas_lr(epoch + 1, cfg), "loss_max": round(lmax, 5),
                                "loss_min_kd": round(lmin, 5)})
        calibrate(net, net.max_child(), x, cfg.calib_batches, cfg.batch_size, cfg.seed)
    finally:
        torch.set_num_threads(threads)
    return BigNASResult(net.eval(), cfg, split.name, history, round(time.perf_counter() - t0, 2))
