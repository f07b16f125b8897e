"""Evaluators: one object that measures a model on held-out data, shared by the methods
that need a number for a model (connectivity paths, PLeaS/aTLAS comparisons, greedy soups).

An evaluator is called on a module and returns a dict of metrics; ``primary`` names the
metric to optimise and ``higher_is_better`` its direction. ``scorer(model)`` adapts it to
the greedy soup's ``score(state_dict) -> float`` (higher is better). ``loss(model, batch)``
is the differentiable training loss on one batch, for methods that learn coefficients.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch.nn import functional as F

StateDict = dict[str, torch.Tensor]


def _device_of(model) -> torch.device:
    from .placement import model_device

    return model_device(model)


class ClassificationEvaluator:
    """Cross-entropy and accuracy of a classifier on (x, y)."""

    primary = "accuracy"
    higher_is_better = True

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024, name: str = "classification"):
        if len(x) != len(y) or len(y) == 0:
            raise ValueError(f"evaluator needs as many labels as inputs (got {len(x)} inputs, {len(y)} labels)")
        self.x, self.y, self.batch_size, self.name = x, y, batch_size, name

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        was = model.training
        model.eval()
        loss, correct = 0.0, 0
        try:
            dev = _device_of(model)  # batches go to the model's device; the data stays on the CPU
            for xb, yb in zip(self.x.split(self.batch_size), self.y.split(self.batch_size)):
                xb, yb = xb.to(dev), yb.to(dev)
                logits = model(xb)
                loss += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
                correct += int((logits.argmax(-1) == yb).sum())
        finally:
            model.train(was)
        return {"loss": loss / len(self.y), "accuracy": correct / len(self.y)}

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        """Endless shuffled batches (x, y) for training loops."""
        while True:
            order = torch.randperm(len(self.y), generator=generator)
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                yield self.x[idx], self.y[idx]

    def loss(self, model, batch) -> torch.Tensor:
        xb, yb = batch
        dev = _device_of(model)
        return F.cross_entropy(model(xb.to(dev)), yb.to(dev))

    def scorer(self, model: torch.nn.Module) -> Callable[[StateDict], float]:
        work = copy.deepcopy(model)

        def score(sd: StateDict) -> float:
            work.load_state_dict(sd)
            return self(work)[self.primary]

        return score


class CausalLMEvaluator:
    """Mean next-token loss of a causal LM on fixed windows of a text (lower is better)."""

    primary = "loss"
    higher_is_better = False

    def __init__(self, tokenizer, text: str, seqlen: int = 512, max_tokens: int = 4096, batch_size: int = 4):
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:max_tokens]
        n = ids.numel() // seqlen
        if n == 0:
            raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
        self.windows = ids[: n * seqlen].view(n, seqlen)
        self.batch_size = batch_size

    def loss(self, model, batch) -> torch.Tensor:
        batch = batch.to(next(model.parameters()).device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        while True:
            order = torch.randperm(len(self.windows), generator=generator)
            for s in range(0, len(order), batch_size):
                yield self.windows[order[s:s + batch_size]]

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        was = model.training
        model.eval()
        total, count = 0.0, 0
        try:
            for b in self.windows.split(self.batch_size):
                n = b.shape[0] * (b.shape[1] - 1)
                total += float(self.loss(model, b)) * n
                count += n
        finally:
            model.train(was)
        return {"loss": total / count, "perplexity": math.exp(total / count)}

    def scorer(self, model) -> Callable[[StateDict], float]:
        def score(sd: StateDict) -> float:
            model.load_state_dict(sd, strict=False)
            return -self(model)["loss"]

        return score
