"""Short training runs shared by the training-based scores (EL2N, GraNd, forgetting)."""
from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from ..registry import MethodConfig
from ._data import ScoringData

ModelFn = Callable[[ScoringData, int], nn.Module]  # (data, seed) -> fresh model
BatchHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]  # (ids, logits, labels)


class TrainedScoreConfig(MethodConfig):
    """How the scoring models are trained. The references train ResNets with SGD on CIFAR;
    here a small MLP (zoo.MLP) is trained with Adam, like the zoo's classifiers."""

    runs: int = Field(5, ge=1, description="independent runs (seeds) the score is averaged over; the paper uses 10")
    epochs: int = Field(2, ge=0, description="training epochs before scoring (0 = at initialisation)")
    hidden: tuple[int, ...] = Field((64, 64), description="hidden widths of the MLP")
    lr: float = Field(3e-3, gt=0, description="Adam learning rate")
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = Field(0, description="run r uses seed + r for the init and the batch order")


def default_model(data: ScoringData, seed: int, hidden=(64, 64)) -> nn.Module:
    from ..zoo.classifiers import MLP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(data.num_features, tuple(hidden), data.num_classes)


def train_run(data: ScoringData, cfg: TrainedScoreConfig, run: int, epochs: int | None = None,
              model_fn: ModelFn | None = None, on_batch: BatchHook | None = None, device=None) -> nn.Module:
    """Build the model of run `run` and train it for `epochs` epochs; returns it in eval mode.

    `on_batch(ids, logits, labels)` sees every minibatch's logits from the training forward
    pass (before the optimiser step), which is where forgetting events are counted; ids stay
    on the CPU, logits and labels are on the training device.
    `device`: None trains where `model_fn` put the model (the CPU by default); else it is moved there.
    The batch order is drawn on the CPU from the run's seed, so it is the same on every device.
    """
    from ..engine.placement import place

    seed = cfg.seed + run
    model = model_fn(data, seed) if model_fn is not None else default_model(data, seed, cfg.hidden)
    dev = place(model, device)
    x, y = data.x.to(dev), data.y.to(dev)  # once per run, not per batch
    epochs = cfg.epochs if epochs is None else epochs
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast and reproducible
    try:
        model.train()
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                ix = idx.to(dev)
                logits = model(x[ix])
                if on_batch is not None:
                    on_batch(idx, logits.detach(), y[ix])
                loss = F.cross_entropy(logits, y[ix])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Logits of every row of x, computed on the model's device, returned on the CPU."""
    from ..engine.placement import model_device

    dev = model_device(model)
    was = model.training
    model.eval()
    try:
        return torch.cat([model(x[i:i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])
    finally:
        model.train(was)
