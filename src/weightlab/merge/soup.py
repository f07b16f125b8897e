"""Greedy and learned model soups (Wortsman et al., "Model soups", ICML 2022).

Greedy: score every ingredient on held-out data, sort best first, start the soup with the
best, then add each next ingredient only if the uniform average with it scores strictly
higher. By construction the soup is never worse than the best ingredient on that data.
Learned (the paper's appendix; the reference's learned_bylayer): one row of mixing logits
per tensor, a softmax over ingredients, starting equal (the uniform soup), trained with
AdamW (lr 0.05, no weight decay, 5 epochs, batch 256) on a held-out loss, together with
a scale on the output logits that is dropped from the result.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from pydantic import Field

from ..engine.progress import progress
from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register

StateDict = dict[str, torch.Tensor]


class GreedySoupConfig(MethodConfig):
    sort: bool = Field(True, description="visit ingredients from best to worst held-out score (the paper's order)")


@dataclass
class SoupResult:
    state_dict: StateDict
    accepted: list[int]  # ingredient indices in the order they entered the soup
    scores: list[float]  # each ingredient's own held-out score
    soup_score: float
    history: list[dict] = field(default_factory=list)


def _floating(sd: StateDict) -> list[str]:
    return [k for k, v in sd.items() if v.is_floating_point()]


def run_greedy_soup_job(job, cfg: GreedySoupConfig, out, force: bool, show_progress: bool | None):
    """`weightlab merge` with method greedy-soup: ingredients from disk, scorer from the config."""
    from ..configfile import build
    from ..engine.source import StateDictSource
    from ..engine.streaming import write_source
    from ..errors import ConfigError
    from ..io.provenance import Provenance
    from ..io.reader import open_checkpoint
    from .engine import MergeResult
    from .scorers import ScorerConfig, scorer_from_config
    from .validate import plan_tensors

    if job.scorer is None:
        raise ConfigError("greedy-soup needs a held-out scorer, e.g. scorer: {type: lm-loss, text: zoo:wiki-heldout} "
                          "or scorer: {type: accuracy, dataset: digits}")
    scfg = build(ScorerConfig, job.scorer, "scorer")
    cks = [open_checkpoint(m.path) for m in job.models]
    plan_tensors(cks, None, [m.name_map for m in job.models])  # same structure, before any scoring
    score = scorer_from_config(scfg, cks[0].folder())
    res = greedy_soup([ck.state_dict() for ck in cks], score, cfg, show_progress=show_progress)
    report = {"method": "greedy-soup", "accepted": [job.models[i].path for i in res.accepted],
              "scores": dict(zip([m.path for m in job.models], res.scores)), "soup_score": res.soup_score}
    if out is None:
        return MergeResult(None, res.state_dict, report)
    prov = Provenance(method="merge/greedy-soup", params={**job.model_dump(), "result": report},
                      inputs=[m.path for m in job.models])
    path = write_source(StateDictSource(res.state_dict, cks[0].config, cks[0].path), out, provenance=prov,
                        inputs=[ck.path for ck in cks], force=force, show_progress=show_progress)
    return MergeResult(path, None, report)


@register("merge", "greedy-soup", kind="merge-model", config=GreedySoupConfig, regime=Regime.WHOLE_MODEL,
          job_runner=run_greedy_soup_job,
          paper="Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing "
                "inference time (Wortsman et al., 2022)",
          summary="add ingredients best-first, keeping each only if the held-out score strictly improves")
def greedy_soup(ingredients: list[StateDict], score: Callable[[StateDict], float],
                cfg: GreedySoupConfig = GreedySoupConfig(), show_progress: bool | None = None) -> SoupResult:
    if not ingredients:
        raise ValueError("greedy soup needs at least one ingredient")
    scores = [float(score(sd)) for sd in progress(ingredients, "scoring ingredients", enabled=show_progress)]
    order = sorted(range(len(ingredients)), key=lambda i: -scores[i]) if cfg.sort else list(range(len(ingredients)))
    first = order[0]
    floats = _floating(ingredients[first])
    soup = {k: (v.double() if k in floats else v.clone()) for k, v in ingredients[first].items()}
    accepted, best = [first], scores[first]
    history = [{"ingredient": first, "score": best, "accepted": True}]
    for i in order[1:]:
        n = len(accepted)
        cand = dict(soup)
        for k in floats:
            cand[k] = soup[k] * (n / (n + 1)) + ingredients[i][k].double() / (n + 1)
        s = float(score(_cast_like(cand, ingredients[first])))
        ok = s > best
        history.append({"ingredient": i, "score": s, "accepted": ok})
        if ok:
            soup, best = cand, s
            accepted.append(i)
    return SoupResult(_cast_like(soup, ingredients[first]), accepted, scores, best, history)


def _cast_like(sd: StateDict, like: StateDict) -> StateDict:
    return {k: v.to(like[k].dtype) for k, v in sd.items()}


def uniform_soup(ingredients: list[StateDict]) -> StateDict:
    """The plain average of every floating tensor (integer buffers from the first ingredient)."""
    out = {}
    for k, v in ingredients[0].items():
        out[k] = torch.stack([sd[k].double() for sd in ingredients]).mean(0).to(v.dtype) if v.is_floating_point() \
            else v.clone()
    return out


class LearnedSoupConfig(MethodConfig):
    by_layer: bool = Field(True, description="one mixing row per tensor (the reference's learned_bylayer); "
                                             "False: one row for the whole model")
    lr: float = Field(0.05, gt=0, description="AdamW learning rate (the reference's)")
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(5, gt=0)
    steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    batch_size: int = Field(256, gt=0)
    learn_scale: bool = Field(True, description="train a logit scale beta with the weights (classification only; "
                                                 "it is not part of the soup)")
    seed: int = 0


@dataclass
class LearnedSoupResult:
    state_dict: StateDict
    weights: torch.Tensor  # (rows, ingredients), each row a softmax
    rows: list[str]  # tensor names, in the order of the rows ("*" for one row)
    losses: list[float] = field(default_factory=list)
    scale: float = 1.0
    seconds: float = 0.0

    def __iter__(self):
        # ``soup, weights = learned_soup(...)`` keeps working for callers of the old tuple return
        return iter((self.state_dict, self.weights))


class _Mixed(torch.nn.Module):
    """The model run with sum_i softmax(logits)[row, i] * ingredient_i for every floating tensor."""

    def __init__(self, model: torch.nn.Module, ingredients: list[StateDict], by_layer: bool, learn_scale: bool):
        super().__init__()
        self.model = model
        self.names = _floating(ingredients[0])
        for i, sd in enumerate(ingredients[1:], 1):
            bad = [k for k in self.names if k not in sd or sd[k].shape != ingredients[0][k].shape]
            if bad:
                raise ConfigError(f"ingredient {i} lacks or reshapes tensor '{bad[0]}': all ingredients must share "
                                  f"one architecture")
        own = set(model.state_dict())
        missing = [k for k in self.names if k not in own]
        if missing:
            raise ConfigError(f"the model has no tensor '{missing[0]}' that the ingredients hold: pass the module "
                              f"the ingredients were saved from")
        self.stacked = {k: torch.stack([sd[k].detach().float() for sd in ingredients]) for k in self.names}
        # equal logits: training starts at the uniform soup, as in the reference
        self.logits = torch.nn.Parameter(torch.zeros(len(self.names) if by_layer else 1, len(ingredients)))
        self.beta = torch.nn.Parameter(torch.ones(())) if learn_scale else None
        self.by_layer = by_layer

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits, -1)

    def params(self, w: torch.Tensor) -> StateDict:
        return {k: torch.tensordot(w[j if self.by_layer else 0], self.stacked[k], 1) for j, k in enumerate(self.names)}

    def forward(self, *args, **kwargs):
        from torch.func import functional_call

        out = functional_call(self.model, self.params(self.weights()), args, kwargs)
        return out * self.beta if self.beta is not None else out


def _evaluator_from_config(scfg, reference):
    """(module, evaluator) for a merge config's ``scorer:`` mapping, as the greedy soup reads it."""
    import json

    from ..engine.evaluators import CausalLMEvaluator, ClassificationEvaluator

    config = json.loads((reference / "config.json").read_text()) if (reference / "config.json").is_file() else {}
    if scfg.type == "accuracy":
        if config.get("model_type") not in ("weightlab-zoo-mlp", "weightlab-zoo-classifier") or \
                config.get("kind", "mlp") != "mlp":
            raise ConfigError("learned-soup with an accuracy scorer works on the zoo's MLP folders "
                              "(weightlab zoo export); for other models call learned_soup() with an evaluator")
        from ..io.reader import open_checkpoint
        from ..zoo import MLP, load_dataset

        data = load_dataset(scfg.dataset or config.get("dataset", "digits"))
        sd = open_checkpoint(reference).state_dict()
        hidden = tuple(sd[k].shape[0] for k in sd if k.endswith("weight"))[:-1]
        # the split the greedy soup scores on: the zoo datasets have no separate validation split
        return MLP(data.num_features, hidden, data.num_classes), ClassificationEvaluator(data.x_test, data.y_test)
    from pathlib import Path

    from ..io.hf import load_causal_lm

    model, tok = load_causal_lm(reference)
    if scfg.text.startswith("zoo:wiki-"):
        from ..zoo import wiki_text

        text = wiki_text(scfg.text.removeprefix("zoo:wiki-"))
    else:
        p = Path(scfg.text)
        if not p.is_file():
            raise ConfigError(f"scorer text file '{p}' does not exist")
        text = p.read_text(encoding="utf-8")
    return model, CausalLMEvaluator(tok, text, scfg.seqlen, scfg.max_tokens)


def run_learned_soup_job(job, cfg: "LearnedSoupConfig", out, force: bool, show_progress: bool | None):
    """`weightlab merge` with method learned-soup: the mixing weights learn on the scorer's data."""
    from ..configfile import build
    from ..engine.source import StateDictSource
    from ..engine.streaming import write_source
    from ..io.provenance import Provenance
    from ..io.reader import open_checkpoint
    from .engine import MergeResult
    from .scorers import ScorerConfig
    from .validate import plan_tensors

    if job.scorer is None:
        raise ConfigError("learned-soup needs held-out data to learn on, e.g. scorer: {type: accuracy, dataset: "
                          "digits} or scorer: {type: lm-loss, text: zoo:wiki-heldout}")
    scfg = build(ScorerConfig, job.scorer, "scorer")
    cks = [open_checkpoint(m.path) for m in job.models]
    plan_tensors(cks, None, [m.name_map for m in job.models])
    model, evaluator = _evaluator_from_config(scfg, cks[0].folder())
    res = learned_soup([ck.state_dict() for ck in cks], model, evaluator, cfg, show_progress=show_progress)
    model.load_state_dict(res.state_dict, strict=False)
    report = {"method": "learned-soup", "rows": res.rows, "weights": res.weights.tolist(),
              "loss_start": res.losses[0], "loss_end": res.losses[-1],
              "metrics": evaluator(model), "seconds": round(res.seconds, 3)}
    if out is None:
        return MergeResult(None, res.state_dict, report)
    prov = Provenance(method="merge/learned-soup", params={**job.model_dump(), "result": report},
                      inputs=[m.path for m in job.models])
    path = write_source(StateDictSource(res.state_dict, cks[0].config, cks[0].path), out, provenance=prov,
                        inputs=[ck.path for ck in cks], force=force, show_progress=show_progress)
    return MergeResult(path, None, report)


@register("merge", "learned-soup", kind="merge-model", config=LearnedSoupConfig, regime=Regime.WHOLE_MODEL,
          job_runner=run_learned_soup_job,
          paper="Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing "
                "inference time (Wortsman et al., 2022), appendix: learned soup",
          summary="learn softmax mixing weights per tensor by gradient descent on a held-out loss")
def learned_soup(ingredients: list[StateDict], model: torch.nn.Module, train=None, cfg: LearnedSoupConfig | None = None,
                 loss_fn: Callable | None = None, show_progress: bool | None = None, **params) -> LearnedSoupResult:
    """Learn mixing weights for ``ingredients`` (state dicts of ``model``'s architecture).

    ``train``: an evaluator from ``engine.evaluators`` (its ``batches`` and differentiable
    ``loss``; ClassificationEvaluator on held-out data, or CausalLMEvaluator on held-out
    text), or a callable ``loss(module) -> tensor`` computed on fixed data (then every
    step sees the same data; ``steps`` defaults to 100). ``loss_fn(module, batch)``
    replaces the evaluator's loss. Floating buffers (BatchNorm statistics) are mixed with
    their own row; the model runs in eval mode so it uses them.
    """
    import math
    import time

    if not ingredients:
        raise ConfigError("a learned soup needs at least one ingredient")
    fixed = callable(train) and not hasattr(train, "batches")
    if fixed and "steps" not in params and (cfg is None or cfg.steps is None):
        params["steps"] = 100
    cfg = cfg or LearnedSoupConfig(**params)
    if train is None:
        raise ConfigError("a learned soup needs held-out data: an evaluator (engine.evaluators) or a loss callable")
    t0 = time.perf_counter()
    # the logit scale only makes sense for a classifier's cross-entropy
    scaled = cfg.learn_scale and not fixed and loss_fn is None and getattr(train, "primary", None) == "accuracy"
    mixed = _Mixed(model, ingredients, cfg.by_layer, scaled)
    if fixed:
        batches, step_loss = iter(lambda: None, 0), (lambda m, _batch: train(m))
        steps = cfg.steps
    else:
        step_loss = loss_fn or train.loss
        n = len(train.y) if hasattr(train, "y") else len(train.windows) if hasattr(train, "windows") else len(train)
        steps = cfg.steps or cfg.epochs * max(1, math.ceil(n / cfg.batch_size))
        batches = train.batches(cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    opt = torch.optim.AdamW([p for p in (mixed.logits, mixed.beta) if p is not None], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    was = model.training
    model.eval()
    losses = []
    try:
        for _ in progress(range(steps), "learned soup", enabled=show_progress):
            loss = step_loss(mixed, next(batches))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        model.train(was)
    with torch.no_grad():
        w = mixed.weights().double()
        soup = {k: v.clone() for k, v in ingredients[0].items()}
        for j, k in enumerate(mixed.names):
            stacked = torch.stack([sd[k].double() for sd in ingredients])
            soup[k] = torch.tensordot(w[j if cfg.by_layer else 0], stacked, 1).to(ingredients[0][k].dtype)
    return LearnedSoupResult(soup, w.float(), mixed.names if cfg.by_layer else ["*"], losses,
                             float(mixed.beta.detach()) if mixed.beta is not None else 1.0, time.perf_counter() - t0)
