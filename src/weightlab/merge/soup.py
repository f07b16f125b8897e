"""Greedy and learned model soups (Wortsman et al., "Model soups", ICML 2022).

Greedy: score every ingredient on held-out data, sort best first, start the soup with the
best, then add each next ingredient only if the uniform average with it scores strictly
higher. By construction the soup is never worse than the best ingredient on that data.
Learned: per-tensor (per-layer) mixing weights, a softmax over ingredients, trained by
gradient descent on a held-out loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from pydantic import Field

from ..engine.progress import progress
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


@register("merge", "greedy-soup", kind="whole", config=GreedySoupConfig, regime=Regime.WHOLE_MODEL,
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


def learned_soup(ingredients: list[StateDict], model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], torch.Tensor],
                 steps: int = 100, lr: float = 0.05, by_layer: bool = True) -> tuple[StateDict, torch.Tensor]:
    """Learn mixing logits (one row per tensor if ``by_layer``, else one) by minimizing ``loss_fn``.

    ``loss_fn(m)`` evaluates the functional model on held-out data. Returns the soup and the
    mixing weights (softmax over ingredients).
    """
    from torch.func import functional_call

    names = _floating(ingredients[0])
    stacked = {k: torch.stack([sd[k].float() for sd in ingredients]) for k in names}
    logits = torch.zeros(len(names) if by_layer else 1, len(ingredients), requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)

    def mix(weights):
        return {k: (weights[j if by_layer else 0].view(-1, *[1] * (stacked[k].dim() - 1)) * stacked[k]).sum(0)
                for j, k in enumerate(names)}

    class _Bound(torch.nn.Module):
        def __init__(self, params):
            super().__init__()
            self.params = params

        def forward(self, *a, **kw):
            return functional_call(model, self.params, a, kw)

    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(_Bound(mix(torch.softmax(logits, -1))))
        loss.backward()
        opt.step()
    with torch.no_grad():
        w = torch.softmax(logits, -1)
        soup = {k: v.clone() for k, v in ingredients[0].items()}
        soup.update({k: v.to(ingredients[0][k].dtype) for k, v in mix(w).items()})
    return soup, w.detach()
