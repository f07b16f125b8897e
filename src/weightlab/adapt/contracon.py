"""ConTraCon (Roy et al., ICCV 2023, Exemplar-Free Continual Transformer with Convolutions).

Task 0 trains the whole transformer. For each later task t the attention Q/K/V weights stay
frozen and every head's row slice W^(h) ((out/H) x in) is re-weighted as an image:

    W_t^(h) = K_{t,h} * W^(h) + sigmoid(g_{t,h}) W^(h)

with * a 2-D convolution (1 -> 1 channel, k x k, same zero padding, with bias) and g a learnable
skip gate. Per task and projection that is H(k^2 + 1) + H trainable numbers. Defaults follow the
reference CLI: k = 15, PyTorch's Conv2d init, g = 1. Heads are given as ``head_dim`` (so GQA's
K/V projections get their own head count) or ``heads``. The reference hard-codes a 4-head gate;
here it has one entry per head. Biases stay frozen (the reference's Q/K/V have none).

``init="identity"`` is a delta kernel, zero bias and a closed gate (g = -inf): W_t = W exactly.
It represents task 0 inside :class:`ContraconTasks`; training from it leaves the gate closed
(its gradient is 0), so it is not a training start.

:class:`ContraconTasks` manages the tasks: per-task snapshots of the adapter tensors (and of a
per-task classifier head), switching between them, and task identification without task ids:
every task's weights run on augmented copies of the input and the task whose softmax entropy,
averaged over the copies, is lowest wins. The reference also unfreezes LayerNorms for t >= 1
without snapshotting them; here everything outside the adapters and the head stays frozen, so
old tasks cannot drift.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from .layer import AdapterMethod


class ContraconConfig(MethodConfig):
    kernel: int = 15
    head_dim: int | None = 64  # rows per head; heads = out / head_dim
    heads: int | None = None  # alternative to head_dim (same head count on every target)
    gate_init: float = 1.0
    init: Literal["default", "identity"] = "default"
    seed: int | None = None


def reweight(W: torch.Tensor, kernels: torch.Tensor, bias: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """W' (out, in) from W (out, in) split into H = len(gate) row blocks, one conv per block."""
    H, k = kernels.shape[0], kernels.shape[-1]
    img = W.reshape(1, H, W.shape[0] // H, W.shape[1])  # one channel per head
    conv = F.conv2d(img, kernels, bias, padding=k // 2, groups=H)
    return (conv + torch.sigmoid(gate)[None, :, None, None] * img).reshape(W.shape)


@register("adapt", "contracon", kind="adapter", regime=Regime.WHOLE_MODEL, config=ContraconConfig,
          paper="Roy et al. 2023, Exemplar-Free Continual Transformer with Convolutions (ICCV 2023); "
                "reference code CVIR/contracon",
          summary="per-task, per-head k x k convolution of frozen Q/K/V weights plus a sigmoid skip gate",
          layers="linear, conv1d", trainable="H*(k^2+1) + H per projection")
class Contracon(AdapterMethod):
    name = "contracon"
    materialize = True
    invertible = False

    def heads_of(self, out_f: int, name: str = "") -> int:
        H = self.cfg.heads or (out_f // self.cfg.head_dim if self.cfg.head_dim else 0)
        if H < 1 or out_f % H:
            raise ConfigError(f"contracon cannot split the {out_f} output rows of '{name}' into heads "
                              f"(heads={self.cfg.heads}, head_dim={self.cfg.head_dim}); set head_dim to the model's")
        return H

    def create(self, layer, W0, init=True):
        k = self.cfg.kernel
        if k < 1 or k % 2 == 0:
            raise ConfigError(f"contracon kernel must be odd for same padding, got {k}")
        H = self.heads_of(W0.shape[0], layer.layer_name)
        K, b, g = torch.zeros(H, 1, k, k), torch.zeros(H), torch.full((H,), float(self.cfg.gate_init))
        if init:
            init_state(K, b, g, self.cfg)
        ad = layer.adapter
        ad.kernels, ad.kbias, ad.gate = nn.Parameter(K), nn.Parameter(b), nn.Parameter(g)
        return W0

    def delta(self, layer, W):
        ad = layer.adapter
        return reweight(W, ad.kernels.float(), ad.kbias.float(), ad.gate.float()) - W

    def trainable_count(self, out_f, in_f):
        H = self.heads_of(out_f)
        return H * (self.cfg.kernel ** 2 + 1) + H

    @classmethod
    def peft_factors(cls, t, cfg, W0, svd_rank):
        from ..tensor.svd import lowrank_factor

        if W0 is None or not svd_rank:
            raise ConfigError("contracon is not LoRA-shaped: export it with an SVD rank (--svd-rank) and the base "
                              "model, or merge it per task")
        W = W0.float()
        return lowrank_factor(reweight(W, t["kernels"].float(), t["kbias"].float(), t["gate"].float()) - W, svd_rank)


def init_state(K: torch.Tensor, b: torch.Tensor, g: torch.Tensor, cfg) -> None:
    """Fill (kernels, bias, gate) in place with the configured start."""
    k = K.shape[-1]
    with torch.no_grad():
        if cfg.init == "identity":
            K.zero_()
            K[:, 0, k // 2, k // 2] = 1
            b.zero_()
            g.fill_(-math.inf)
            return
        gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        bound = 1 / math.sqrt(k * k)  # nn.Conv2d's default: kaiming_uniform(a=sqrt(5)) and U(+-1/sqrt(fan_in))
        K.uniform_(-bound, bound, generator=gen)
        b.uniform_(-bound, bound, generator=gen)
        g.fill_(cfg.gate_init)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


class ContraconTasks:
    """Continual tasks on one transformer: attach, snapshot, switch, identify.

    ``ContraconTasks(model, targets=["q_proj", "k_proj", "v_proj"], head="classifier", head_dim=64)``
    after task 0 was trained: the current weights become task 0 (identity re-weighting). Then per
    task: ``new_task()`` (fresh kernels and gates; re-initialize the head yourself if the task has
    new classes), train ``trainable_parameters()``, ``snapshot()``. ``use(t)`` switches to task t;
    ``identify(x)`` picks a task per sample by the lowest mean softmax entropy over augmented copies.
    """

    def __init__(self, model: nn.Module, targets=("q_proj", "k_proj", "v_proj"), head: str | None = None,
                 logits_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None, **config):
        from .api import adapter_layers, attach

        attach(model, "contracon", targets=list(targets) if not isinstance(targets, str) else targets,
               **{**config, "init": "identity"})
        self.model = model
        self.layers = adapter_layers(model)
        self.cfg = next(iter(self.layers.values())).method.cfg.model_copy(update={"init": config.get("init",
                                                                                                   "default")})
        self.head = model.get_submodule(head) if head else None
        self.logits_fn = logits_fn or (lambda m, x: m(x))
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.snapshot()  # task 0: the trained base, re-weighted by the identity

    def _state(self) -> dict[str, torch.Tensor]:
        sd = {f"{n}.{k}": v.detach().clone() for n, m in self.layers.items() for k, v in m.adapter.state_dict().items()}
        if self.head is not None:
            sd.update({f"head.{k}": v.detach().clone() for k, v in self.head.state_dict().items()})
        return sd

    @property
    def num_tasks(self) -> int:
        return len(self.snapshots)

    def trainable_parameters(self) -> list[nn.Parameter]:
        ps = [p for m in self.layers.values() for p in m.adapter.parameters()]
        return ps + (list(self.head.parameters()) if self.head is not None else [])

    def new_task(self, seed: int | None = None) -> int:
        """Fresh kernels and gates for the next task (its id is returned); the head is left as is."""
        cfg = self.cfg.model_copy(update={"seed": seed if seed is not None else self.cfg.seed})
        for m in self.layers.values():
            ad = m.adapter
            init_state(ad.kernels.data, ad.kbias.data, ad.gate.data, cfg)
        for p in self.trainable_parameters():
            p.requires_grad_(True)
        return self.num_tasks

    def snapshot(self) -> int:
        """Store the current per-task tensors as the next task; returns its id."""
        self.snapshots.append(self._state())
        return self.num_tasks - 1

    def use(self, task: int) -> nn.Module:
        if not 0 <= task < self.num_tasks:
            raise ConfigError(f"task {task} has no snapshot; known tasks 0..{self.num_tasks - 1}")
        sd = self.snapshots[task]
        with torch.no_grad():
            for n, m in self.layers.items():
                for k, v in m.adapter.state_dict().items():
                    v.copy_(sd[f"{n}.{k}"])
            if self.head is not None:
                for k, v in self.head.state_dict().items():
                    v.copy_(sd[f"head.{k}"])
        return self.model

    @torch.no_grad()
    def task_entropies(self, x: torch.Tensor, augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
                       | None = None, n_aug: int = 1, seed: int = 0) -> torch.Tensor:
        """(tasks, batch) mean softmax entropy of each task's prediction over ``n_aug`` augmented copies."""
        g = torch.Generator().manual_seed(seed)
        copies = [x] if augment is None else [augment(x, g) for _ in range(n_aug)]
        was = self.model.training
        self.model.eval()
        out = []
        for t in range(self.num_tasks):
            self.use(t)
            out.append(torch.stack([entropy(self.logits_fn(self.model, c)) for c in copies]).mean(0))
        self.model.train(was)
        return torch.stack(out)

    def identify(self, x: torch.Tensor, augment=None, n_aug: int = 1, seed: int = 0) -> torch.Tensor:
        """Task id per sample: the task whose predictions have the lowest mean entropy."""
        return self.task_entropies(x, augment, n_aug, seed).argmin(0)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, augment=None, n_aug: int = 1, seed: int = 0) -> tuple[torch.Tensor, list]:
        """(task ids, logits per sample) with each sample run under its identified task's weights."""
        tasks = self.identify(x, augment, n_aug, seed)
        logits: list = [None] * len(x)
        for t in tasks.unique().tolist():
            idx = (tasks == t).nonzero().flatten()
            self.use(t)
            y = self.logits_fn(self.model, x[idx])
            for j, i in enumerate(idx.tolist()):
                logits[i] = y[j]
        return tasks, logits
