"""Forgetting events (Toneva et al., 2019), as recorded in the Data Diet reference.

On every minibatch presentation a sample is correct or not; a forgetting event is a
correct -> incorrect transition between two presentations. Samples never classified
correctly in a run score +inf; the score is the mean over runs.
"""
from __future__ import annotations

import time

import torch
from pydantic import Field

from ..engine.progress import progress
from ..registry import Regime, register
from ..tensor.sample_scores import forgetting_scores, forgetting_update
from ._data import as_scoring_data
from ._train import ModelFn, TrainedScoreConfig, train_run
from .table import ScoreTable

PAPER = ("An Empirical Study of Example Forgetting during Deep Neural Network Learning (Toneva et al., ICLR 2019), "
         "as used in Deep Learning on a Data Diet (Paul et al., NeurIPS 2021)")


class ForgettingTracker:
    """Counts forgetting events in any training loop.

        tracker = ForgettingTracker(len(train_set))
        for ids, x, y in loader:
            logits = model(x)
            tracker.update(ids, logits.argmax(1) == y)   # before or after the step, consistently
            ...
        tracker.scores()   # forgetting counts, +inf where never correct
    """

    def __init__(self, num_samples: int):
        self.prev_correct = torch.zeros(num_samples, dtype=torch.bool)
        self.forgets = torch.zeros(num_samples, dtype=torch.long)
        self.ever_correct = torch.zeros(num_samples, dtype=torch.bool)
        self.presentations = torch.zeros(num_samples, dtype=torch.long)

    def update(self, ids: torch.Tensor, correct: torch.Tensor) -> None:
        ids = torch.as_tensor(ids).long().cpu()
        correct = torch.as_tensor(correct).bool().cpu()
        if ids.shape != correct.shape:
            raise ValueError(f"{ids.numel()} ids for {correct.numel()} correctness flags")
        forgetting_update(self.prev_correct, self.forgets, self.ever_correct, ids, correct)
        self.presentations[ids] += 1

    def update_from_logits(self, ids: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.update(ids, logits.detach().argmax(-1).cpu() == labels.cpu())

    @property
    def never_learned(self) -> torch.Tensor:
        """Samples never classified correctly (among those presented at least once)."""
        return ~self.ever_correct

    def scores(self) -> torch.Tensor:
        return forgetting_scores(self.forgets, self.ever_correct)


class ForgettingConfig(TrainedScoreConfig):
    """Forgetting needs the whole training run, not an early checkpoint: epochs default to 20
    (the zoo MLP's full training); the reference trains 200 epochs on CIFAR-10."""

    epochs: int = Field(20, ge=1, description="training epochs during which forgetting events are counted")


@register("data", "forgetting", paper=PAPER, config=ForgettingConfig, regime=Regime.WHOLE_MODEL, kind="score", summary="forgetting events (correct -> wrong) during training; never learned = inf")
def forgetting(data, cfg: ForgettingConfig | None = None, *, model_fn: ModelFn | None = None,
               show_progress: bool | None = None, device=None) -> ScoreTable:
    """Forgetting score of every training sample: mean over `runs` of the events in one run (+inf if never learned).

    `device`: where the runs train (None: the CPU); the event counts are kept on the CPU."""
    cfg = cfg or ForgettingConfig()
    d = as_scoring_data(data)
    t0 = time.perf_counter()
    total = torch.zeros(len(d), dtype=torch.float64)
    never = torch.zeros(len(d), dtype=torch.long)
    for run in progress(range(cfg.runs), "forgetting runs", enabled=show_progress):
        tr = ForgettingTracker(len(d))
        train_run(d, cfg, run, model_fn=model_fn, on_batch=tr.update_from_logits, device=device)
        total += tr.scores()
        never += tr.never_learned.long()
    extra = {"never_learned_runs": never}
    if d.source_ids:
        extra["source_id"] = d.source_ids
    return ScoreTable("forgetting", total / cfg.runs, d.y, params=cfg.model_dump(), dataset=d.name,
                      label_names=d.label_names, seconds=time.perf_counter() - t0, extra=extra)
