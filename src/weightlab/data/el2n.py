"""EL2N: the error L2-norm ||softmax(f(x)) - onehot(y)||, early in training, averaged over runs."""
from __future__ import annotations

import time

import torch
from torch import nn

from ..engine.progress import progress
from ..registry import Regime, register
from ..tensor.sample_scores import el2n as _el2n
from ._data import as_scoring_data
from ._train import ModelFn, TrainedScoreConfig, predict_logits, train_run
from .table import ScoreTable

PAPER = "Deep Learning on a Data Diet: Finding Important Examples Early in Training (Paul et al., NeurIPS 2021)"


class El2nConfig(TrainedScoreConfig):
    """Defaults: 5 runs (the paper recommends 10) scored after 2 epochs (the paper: epoch 20 of 200)."""


def el2n_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """EL2N of every sample under one trained model (float64, (N,)). Any classifier returning logits."""
    return _el2n(predict_logits(model, x, batch_size), y)


@register("data", "el2n", paper=PAPER, config=El2nConfig, regime=Regime.WHOLE_MODEL, kind="score",
          summary="error L2-norm of softmax vs one-hot early in training, mean over runs (high = hard / mislabeled)")
def el2n(data, cfg: El2nConfig | None = None, *, model_fn: ModelFn | None = None,
         show_progress: bool | None = None, device=None) -> ScoreTable:
    """EL2N of every training sample: train `runs` models for `epochs` epochs each, average the error norms.

    `data`: a zoo dataset name, a CSV path, a zoo Dataset or ScoringData. `model_fn(data, seed)`
    replaces the default MLP. `device`: where the runs train and predict (None: the CPU); scores
    come back to the CPU.
    """
    cfg = cfg or El2nConfig()
    d = as_scoring_data(data)
    t0 = time.perf_counter()
    total = torch.zeros(len(d), dtype=torch.float64)
    for run in progress(range(cfg.runs), "el2n runs", enabled=show_progress):
        model = train_run(d, cfg, run, model_fn=model_fn, device=device)
        total += el2n_scores(model, d.x, d.y)
    return ScoreTable("el2n", total / cfg.runs, d.y, params=cfg.model_dump(), dataset=d.name,
                      label_names=d.label_names, seconds=time.perf_counter() - t0,
                      extra={"source_id": d.source_ids} if d.source_ids else {})
