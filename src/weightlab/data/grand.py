"""GraNd: the norm of each sample's loss gradient over all parameters, averaged over runs.

Per-sample gradients are vectorised with torch.func (vmap over grad of a functional call):
one batched call per chunk of samples, never a Python loop over samples.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from ..engine.progress import progress
from ..registry import Regime, register
from ._data import as_scoring_data
from ._train import ModelFn, TrainedScoreConfig, train_run
from .el2n import PAPER
from .table import ScoreTable


class GrandConfig(TrainedScoreConfig):
    """Defaults: 5 runs scored after 2 epochs (the paper also scores at initialisation: epochs=0)."""

    chunk_size: int = Field(256, ge=1, description="samples per vectorised gradient call (memory vs speed)")


def grand_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, chunk_size: int = 256,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """||grad_theta loss(f(x_i), y_i)||_2 over every trainable parameter, for every sample (float64, (N,)).

    Vectorised with torch.func.vmap(grad(...)). The model runs in eval mode (BatchNorm uses
    its running statistics; per-sample batch statistics would be meaningless). Frozen
    parameters (requires_grad=False) are held fixed and not counted. `loss_fn(logits, y)`
    defaults to cross-entropy and must reduce to a scalar for one sample.
    """
    from ..engine.placement import model_device

    loss_fn = loss_fn or F.cross_entropy
    dev = model_device(model)
    # MPS has no float64: square sums in float32 there (the norms are reported, not accumulated further)
    acc = torch.float32 if dev.type == "mps" else torch.float64
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    fixed = {**frozen, **buffers}

    def sample_loss(p, xi, yi):
        out = functional_call(model, {**p, **fixed}, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    was = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(x), chunk_size):
            g = per_sample(params, x[start:start + chunk_size].to(dev), y[start:start + chunk_size].to(dev))
            sq = sum(t.detach().to(acc).flatten(1).pow(2).sum(1) for t in g.values())
            out.append(torch.sqrt(sq).cpu().double())
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@register("data", "grand", paper=PAPER, config=GrandConfig, regime=Regime.WHOLE_MODEL, kind="score",
          summary="per-sample loss-gradient norm over all parameters (torch.func), mean over runs (high = hard)")
def grand(data, cfg: GrandConfig | None = None, *, model_fn: ModelFn | None = None,
          show_progress: bool | None = None, device=None) -> ScoreTable:
    """GraNd of every training sample: train `runs` models for `epochs` epochs, average the gradient norms.

    `device`: where the runs train and the per-sample gradients are taken (None: the CPU)."""
    cfg = cfg or GrandConfig()
    d = as_scoring_data(data)
    t0 = time.perf_counter()
    total = torch.zeros(len(d), dtype=torch.float64)
    for run in progress(range(cfg.runs), "grand runs", enabled=show_progress):
        model = train_run(d, cfg, run, model_fn=model_fn, device=device)
        total += grand_scores(model, d.x, d.y, chunk_size=cfg.chunk_size)
    return ScoreTable("grand", total / cfg.runs, d.y, params=cfg.model_dump(), dataset=d.name,
                      label_names=d.label_names, seconds=time.perf_counter() - t0,
                      extra={"source_id": d.source_ids} if d.source_ids else {})
