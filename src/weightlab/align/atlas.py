"""aTLAS: learned anisotropic scaling of task vectors (Zhang et al., "Knowledge Composition
using Task Vectors with Learned Anisotropic Scaling", NeurIPS 2024).

theta(L) = theta_0 + sum_i sum_b L[i, b] tau_i[b]: one learnable coefficient per task vector
and per parameter tensor ("block"), starting at zero (so training starts at theta_0), fitted
by gradient descent on a small labelled set (cross-entropy) or an unlabelled one (mean
prediction entropy). Only L is trained; theta_0 and the task vectors are frozen.
Variants: ``blockwise=False`` learns one scalar per task vector (task arithmetic with a
learned lambda); ``partitions=K`` ("aTLAS x K") splits every tensor's entries into K fixed
random groups with a coefficient each. Paper defaults: AdamW, lr 1e-3, weight decay 0.1,
batch 128, 20 epochs, constant learning rate.

Buffers (BatchNorm statistics) are taken from theta_0 and not composed.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from ..engine.progress import progress
from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register

StateDict = dict[str, torch.Tensor]


class AtlasConfig(MethodConfig):
    objective: str = Field("supervised", pattern="^(supervised|entropy)$",
                           description="cross-entropy on labels, or prediction entropy on unlabelled inputs")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    batch_size: int = Field(128, gt=0)
    epochs: int = Field(20, gt=0)
    steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    blockwise: bool = Field(True, description="one coefficient per tensor (False: one per task vector)")
    partitions: int = Field(1, gt=0, description="aTLAS x K: random groups of entries per tensor")
    seed: int = 0


class Composition(nn.Module):
    """theta_0 + sum L * tau as a module: calling it runs the wrapped model with composed weights."""

    def __init__(self, model: nn.Module, base: StateDict, tasks: list[StateDict], blockwise: bool = True,
                 partitions: int = 1, seed: int = 0):
        super().__init__()
        self.model = model  # its own parameters are replaced in every call, so they get no gradient
        self.names = [n for n, p in model.named_parameters() if p.is_floating_point()]
        if not tasks:
            raise ConfigError("aTLAS needs at least one fine-tuned model")
        for i, sd in enumerate(tasks):
            missing = [n for n in self.names if n not in sd or sd[n].shape != base[n].shape]
            if missing:
                raise ConfigError(f"fine-tune {i} lacks or reshapes tensor '{missing[0]}': all models must share "
                                  f"the base model's architecture")
        self.base = {n: base[n].detach().double() for n in self.names}
        self.taus = {n: torch.stack([sd[n].detach().double() - self.base[n] for sd in tasks]) for n in self.names}
        self.buffers_ = {n: b for n, b in model.named_buffers()}
        blocks = len(self.names) if blockwise else 1
        self.blockwise, self.partitions = blockwise, partitions
        dev = self.base[self.names[0]].device if self.names else torch.device("cpu")
        self.coef = nn.Parameter(torch.zeros(len(tasks), blocks, partitions, device=dev))
        g = torch.Generator().manual_seed(seed)  # CPU draws: the same partitions on every device
        self.part = {n: torch.randint(0, partitions, self.base[n].shape, generator=g).to(dev) for n in self.names}
        self._base32 = {n: v.float() for n, v in self.base.items()}
        self._taus32 = {n: v.float() for n, v in self.taus.items()}

    def entry_coef(self, j: int, n: str, coef: torch.Tensor | None = None) -> torch.Tensor:
        c = (self.coef if coef is None else coef)[:, j if self.blockwise else 0]  # (T, K)
        if self.partitions == 1:
            return c.reshape(-1, *[1] * self.base[n].dim())  # broadcasts; no per-entry gather
        return c[:, self.part[n]]  # (T, *shape)

    def params(self) -> StateDict:
        return {n: self._base32[n] + (self.entry_coef(j, n) * self._taus32[n]).sum(0)
                for j, n in enumerate(self.names)}

    def forward(self, *args, **kwargs):
        return functional_call(self.model, {**self.params(), **self.buffers_}, args, kwargs)

    @torch.no_grad()
    def merged_state_dict(self) -> StateDict:
        """Composed weights, summed in float64 (one-hot coefficients give each fine-tune exactly)."""
        sd = {k: v.clone() for k, v in self.model.state_dict().items()}
        coef = self.coef.double()
        for j, n in enumerate(self.names):
            c = self.entry_coef(j, n, coef)
            sd[n] = (self.base[n] + (c * self.taus[n]).sum(0)).to(sd[n].dtype)
        return sd


@dataclass
class AtlasResult:
    state_dict: StateDict
    coefficients: torch.Tensor  # (tasks, blocks, partitions)
    blocks: list[str]  # tensor names, in the order of the coefficient blocks
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1).mean()


@register("merge", "atlas", kind="merge-model", config=AtlasConfig, regime=Regime.WHOLE_MODEL,
          paper="Knowledge Composition using Task Vectors with Learned Anisotropic Scaling (Zhang et al., 2024)",
          summary="learn one coefficient per task vector and tensor (from zero) on a small labelled or unlabelled set")
def atlas(base: nn.Module, finetunes: list, train, cfg: AtlasConfig | None = None,
          loss_fn: Callable | None = None, show_progress: bool | None = None, device=None, **params) -> AtlasResult:
    """Fit aTLAS coefficients.

    ``finetunes``: modules or state dicts sharing ``base``'s architecture. ``train``: an
    object with ``batches(batch_size, generator)`` yielding batches and, for the supervised
    objective, ``loss(model, batch)`` (engine.evaluators.ClassificationEvaluator has both),
    plus ``len()`` or ``y`` for the epoch length. ``loss_fn(model, batch)`` replaces the
    objective (e.g. matching a teacher's outputs). ``device``: where the coefficients train (None: the
    CPU; MPS has no float64 for the stored task vectors); batches are moved there, results come back
    on the CPU, and ``base`` itself is not moved (a copy is).
    """
    from ..engine.placement import float64_device, on_device

    cfg = cfg or AtlasConfig(**params)
    dev = float64_device(device)
    t0 = time.perf_counter()
    tasks = [f.state_dict() if isinstance(f, nn.Module) else f for f in finetunes]
    model = base
    if on_device(dev):
        model = copy.deepcopy(base).to(dev)
        tasks = [{k: v.to(dev) for k, v in sd.items()} for sd in tasks]
    comp = Composition(model, model.state_dict(), tasks, cfg.blockwise, cfg.partitions, cfg.seed)
    if loss_fn is None:
        if cfg.objective == "supervised":
            loss_fn = train.loss
        else:
            loss_fn = lambda m, batch: _entropy(m(batch[0] if isinstance(batch, (tuple, list)) else batch))  # noqa: E731
    n = len(train.y) if hasattr(train, "y") else len(train)
    steps = cfg.steps or cfg.epochs * max(1, math.ceil(n / cfg.batch_size))
    opt = torch.optim.AdamW([comp.coef], lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = train.batches(cfg.batch_size, gen)
    if on_device(dev):
        batches = (_to(b, dev) for b in batches)
    was = model.training
    model.eval()  # BatchNorm keeps theta_0's statistics while the coefficients train
    losses = []
    try:
        for _ in progress(range(steps), "aTLAS", enabled=show_progress):
            loss = loss_fn(comp, next(batches))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        model.train(was)
    sd = {k: v.cpu() for k, v in comp.merged_state_dict().items()}
    return AtlasResult(sd, comp.coef.detach().cpu().clone(), comp.names if cfg.blockwise else ["*"],
                       losses, time.perf_counter() - t0)


def _to(batch, dev):
    """A batch (tensor, or tuple/list of them) on ``dev``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dev)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, dev) for b in batch)
    return batch
