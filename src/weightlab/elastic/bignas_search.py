"""BigNAS coarse-to-fine selection of a child under a parameter or latency budget, without retraining.

Coarse: every network-wide setting (one width multiplier, one depth, one kernel for all layers) that fits the
budget is measured (BN recalibrated, validation accuracy); the best is kept. Fine: ``fine_steps`` times, one
coordinate of the best child (a layer's width, a stage's depth or kernel) is changed at random; a new child
that fits and measures better replaces it. Unlike xfey/pytorch-BigNAS's search, the coarse grid is the whole
grid (not the first items of an ordered product) and de-duplication uses the mutated child. With
``exhaustive=True`` every child of the space is measured (small spaces; tests). The result is always the best
child measured, and never one over the budget. A transformer (lm) supernet is scored by minus its validation bits
per character (``lm_score``); the coarse grid ties its heads to the width multiplier, the fine phase mutates
one block's heads or MLP width.
"""
from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..engine.result import Result
from ..errors import ConfigError
from .bignas_nets import WIDTH_MULTS, Child, ElasticNet


def latency_ms(net: ElasticNet, child: Child, batch: int = 1, repeats: int = 20) -> float:
    """Median wall time (ms) of one forward of the stand-alone child on a batch of `batch` inputs, CPU."""
    model = net.static_child(child)
    x = net.example_input(batch)
    times = []
    with torch.no_grad():
        model(x)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


@dataclass
class SearchResult(Result):
    child: Child
    score: float
    params: int
    budget: dict
    history: list[dict] = field(default_factory=list)  # every child measured: child, params, score, phase
    seconds: float = 0.0
    metric: str = "accuracy"  # or "bits_per_char" (score = minus bits per character)

    def as_dict(self) -> dict:
        value = {"accuracy": self.score} if self.metric == "accuracy" else {self.metric: -self.score}
        return {"child": self.child.as_dict(), **value, "score": self.score, "metric": self.metric,
                "parameters": self.params, "budget": self.budget, "measured": len(self.history),
                "history": self.history, "seconds": self.seconds}


def coarse_grid(net: ElasticNet) -> list[Child]:
    sp, out = net.space(), []
    depths = sorted(set().union(*map(set, sp["depths"])))
    kernels = sorted(set().union(*map(set, sp["kernels"]))) if sp["kernels"] else [None]
    for w, d, k in itertools.product(WIDTH_MULTS, depths, kernels):
        try:
            out.append(net.check_child(net.uniform_child(w, d, k)))
        except ConfigError:  # a depth some stage does not offer
            continue
    return list(dict.fromkeys(out))


def mutate(net: ElasticNet, child: Child, rng: random.Random) -> Child:
    """`child` with one coordinate (a layer's width, a stage's depth or kernel) changed to another choice."""
    sp = net.space()
    slots = [(k, i) for k, per in sp.items() for i, c in enumerate(per) if len(c) > 1]
    k, i = rng.choice(slots)
    cur = getattr(child, k)
    new = rng.choice([c for c in sp[k][i] if c != cur[i]])
    fields = {f: getattr(child, f) for f in sp}
    fields[k] = cur[:i] + (new,) + cur[i + 1:]
    return Child(**fields)


def all_children(net: ElasticNet) -> list[Child]:
    sp = net.space()
    keys = list(sp)
    per = [list(itertools.product(*sp[k])) if sp[k] else [()] for k in keys]
    return [Child(**dict(zip(keys, combo))) for combo in itertools.product(*per)]


def search(net: ElasticNet, score: Callable[[Child], float], *, max_params: int | None = None,
           max_latency_ms: float | None = None, fine_steps: int = 30, seed: int = 0,
           exhaustive: bool = False, latency: Callable[[Child], float] | None = None,
           metric: str = "accuracy") -> SearchResult:
    """Best child under the budget by `score` (e.g. calibrated validation accuracy; higher is better)."""
    if max_params is None and max_latency_ms is None:
        raise ConfigError("give a budget: max_params and/or max_latency_ms")
    latency = latency or (lambda c: latency_ms(net, c))
    smallest = net.min_child()
    if max_params is not None and net.child_params(smallest) > max_params:
        raise ConfigError(f"no child fits max_params={max_params}: the smallest child has "
                          f"{net.child_params(smallest):,} parameters")
    lat_cache: dict[Child, float] = {}

    def fits(c: Child) -> bool:
        if max_params is not None and net.child_params(c) > max_params:
            return False
        if max_latency_ms is not None:
            if c not in lat_cache:
                lat_cache[c] = latency(c)
            return lat_cache[c] <= max_latency_ms
        return True

    t0 = time.perf_counter()
    history: list[dict] = []
    seen: dict[Child, float] = {}

    def measure(c: Child, phase: str) -> float:
        if c not in seen:
            seen[c] = float(score(c))
            row = {"child": c.as_dict(), "params": net.child_params(c), "score": seen[c], "phase": phase}
            if c in lat_cache:
                row["latency_ms"] = round(lat_cache[c], 4)
            history.append(row)
        return seen[c]

    pool = all_children(net) if exhaustive else coarse_grid(net)
    for c in pool:
        if fits(c):
            measure(c, "exhaustive" if exhaustive else "coarse")
    if not seen:
        if not fits(smallest):
            raise ConfigError(f"no child fits the latency budget {max_latency_ms} ms (the smallest child "
                              f"takes {lat_cache[smallest]:.3f} ms)")
        measure(smallest, "coarse")
    best = max(seen, key=lambda c: (seen[c], -net.child_params(c)))
    rng = random.Random(seed)
    for _ in range(0 if exhaustive else fine_steps):
        cand = mutate(net, best, rng)
        if cand in seen or not fits(cand):
            continue
        if measure(cand, "fine") > seen[best]:
            best = cand
    budget = {"max_params": max_params, "max_latency_ms": max_latency_ms}
    return SearchResult(best, seen[best], net.child_params(best), budget, history,
                        round(time.perf_counter() - t0, 3), metric)


def accuracy_score(net: ElasticNet, split, calib_batches: int = 64, seed: int = 0) -> Callable[[Child], float]:
    """score(child) = validation accuracy after BN recalibration on the training split."""
    from .bignas import calibrate, evaluate

    def score(child: Child) -> float:
        calibrate(net, child, split.x_train, calib_batches, 64, seed)
        return evaluate(net, split.x_val, split.y_val)

    return score


def lm_score(net: ElasticNet, split) -> Callable[[Child], float]:
    """score(child) = minus the validation bits per character (no BN: nothing to recalibrate)."""
    from .bignas_lm import evaluate_lm

    def score(child: Child) -> float:
        net.set_child(child)
        return -evaluate_lm(net, split.x_val, split.y_val)["bits_per_char"]

    return score
