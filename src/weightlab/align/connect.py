"""Linear mode connectivity: the loss along theta(l) = (1 - l) theta_A + l theta_B.

Barrier definitions (both reported, for loss and for error = 1 - accuracy):
- "reference": max_l L(l) - (L(0) + L(1)) / 2, the definition in the git-re-basin code
  (src/cifar10_mlp_barrier_vs_epoch_plot.py) and the one quoted as "barrier" here;
- "linear": max_l [L(l) - ((1 - l) L(0) + l L(1))], the height above the straight chord
  (Frankle et al.; Entezari et al.), which differs when L(0) != L(1).
Networks with BatchNorm have running statistics that are wrong for interpolated weights
(the variance of interpolated units shrinks); with ``bn_data`` they are re-estimated on those
inputs at every point, else the interpolated statistics are used. The reference sidesteps
this with LayerNorm networks.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from pydantic import Field

from ..engine.result import Result
from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register

StateDict = dict[str, torch.Tensor]
_BN = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def interpolate(a: StateDict, b: StateDict, lam: float) -> StateDict:
    """(1 - lam) a + lam b for floating tensors; integer buffers (BN step counts) come from a."""
    return {k: (torch.lerp(v.double(), b[k].double(), lam).to(v.dtype) if v.is_floating_point() else v.clone())
            for k, v in a.items()}


@torch.no_grad()
def reset_batchnorm(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 256) -> bool:
    """Re-estimate BatchNorm running statistics on ``x`` (exact average over batches)."""
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    if not bns:
        return False
    saved = [m.momentum for m in bns]
    was = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average, so the order of batches does not matter
    model.train()
    dev = next(model.parameters()).device
    try:
        for xb in x.split(batch_size):
            model(xb.to(dev))
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was)
    return True


def barriers(lambdas: list[float], values: list[float]) -> dict[str, float]:
    l0, l1 = values[0], values[-1]
    ref = max(values) - 0.5 * (l0 + l1)
    lin = max(v - ((1 - t) * l0 + t * l1) for t, v in zip(lambdas, values))
    return {"reference": ref, "linear": lin}


@dataclass
class Path(Result):
    lambdas: list[float]
    metrics: list[dict[str, float]]  # evaluator output at each point
    barrier: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> {reference, linear}

    def series(self, key: str) -> list[float]:
        return [m[key] for m in self.metrics]

    def midpoint(self) -> dict[str, float]:
        return self.metrics[min(range(len(self.lambdas)), key=lambda i: abs(self.lambdas[i] - 0.5))]

    def as_dict(self) -> dict:
        return {"lambdas": self.lambdas, "metrics": self.metrics, "barrier": self.barrier}


def linear_path(model_a: torch.nn.Module, model_b: torch.nn.Module, evaluator, points: int = 25,
                bn_data: torch.Tensor | None = None, device=None) -> Path:
    """Evaluate ``points`` evenly spaced models from A (l=0) to B (l=1).

    ``device``: where the interpolated models are evaluated (None: where A is); the float64
    interpolation happens there too, A and B themselves are not moved.
    """
    from ..engine.placement import float64_device, model_device

    if points < 2:
        raise ValueError("a path needs at least 2 points")
    dev = float64_device(device) if device is not None else model_device(model_a)
    sa = {k: v.to(dev) for k, v in model_a.state_dict().items()}
    sb = {k: v.to(dev) for k, v in model_b.state_dict().items()}
    work = copy.deepcopy(model_a).to(dev)
    lambdas = [i / (points - 1) for i in range(points)]
    metrics = []
    for lam in lambdas:
        work.load_state_dict(interpolate(sa, sb, lam))
        if bn_data is not None:
            reset_batchnorm(work, bn_data)
        metrics.append(evaluator(work))
    p = Path(lambdas, metrics)
    p.barrier["loss"] = barriers(lambdas, p.series("loss"))
    if "accuracy" in metrics[0]:
        p.barrier["error"] = barriers(lambdas, [1 - m["accuracy"] for m in metrics])
    return p


class ConnectivityConfig(MethodConfig):
    points: int = Field(25, ge=2, description="models on the path, ends included (the reference uses 25)")
    align: bool = Field(True, description="also weight-match B to A and measure the aligned path")
    seed: int = 0


@dataclass
class Connectivity:
    before: Path
    after: Path | None
    perms: dict | None
    analysis: dict | None  # singular-value / singular-vector alignment (analysis.py)
    seconds: float

    def summary(self) -> dict:
        out = {}
        for tag, p in (("before", self.before), ("after", self.after)):
            if p is None:
                continue
            out[tag] = {"barrier": p.barrier, "midpoint": p.midpoint(), "ends": [p.metrics[0], p.metrics[-1]]}
        if self.analysis:
            out["analysis"] = {k: v for k, v in self.analysis.items() if k != "layers"}
        out["seconds"] = round(self.seconds, 2)
        return out


@register("align", "connectivity", kind="whole", config=ConnectivityConfig, regime=Regime.WHOLE_MODEL,
          paper="Git Re-Basin (Ainsworth et al., 2023); Linear Mode Connectivity via Permutation-Based Weight "
                "Matching (Ito et al., 2024)",
          summary="loss/accuracy along the linear path before and after alignment, barriers, spectral alignment")
def connectivity(model_a, model_b, evaluator, spec="auto", cfg: ConnectivityConfig | None = None,
                 bn_data: torch.Tensor | None = None, device=None, **params) -> Connectivity:
    """Paths A->B and (with align) A->pi(B), plus the singular-vector analysis of pi.

    ``device``: where the path is evaluated and the matching costs are built (None: where A is);
    the assignment solves and the singular-vector analysis run on the CPU.
    """
    from .analysis import alignment_analysis
    from .matching import WeightMatchingConfig, weight_matching

    cfg = cfg or ConnectivityConfig(**params)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    odd = [k for k in sa if k not in sb or sa[k].shape != sb[k].shape]
    if odd:
        raise ConfigError(f"tensor '{odd[0]}' has shape {list(sa[odd[0]].shape)} in A but "
                          f"{list(sb[odd[0]].shape) if odd[0] in sb else 'is missing'} in B: a linear path needs "
                          f"one architecture (a PLeaS merge wider than one model has no path to its parents)")
    t0 = time.perf_counter()
    before = linear_path(model_a, model_b, evaluator, cfg.points, bn_data, device)
    after = perms = analysis = None
    if cfg.align:
        aligned, perms = weight_matching(model_a, model_b, spec, WeightMatchingConfig(seed=cfg.seed), device=device)
        after = linear_path(model_a, aligned, evaluator, cfg.points, bn_data, device)
        analysis = alignment_analysis(model_a.state_dict(), model_b.state_dict(), aligned.state_dict())
    return Connectivity(before, after, perms, analysis, time.perf_counter() - t0)
