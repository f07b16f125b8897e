"""Weight matching (Ainsworth, Hayase, Srinivasa, "Git Re-Basin", ICLR 2023).

Find permutations of B's hidden units that maximise sum_w <W_A, pi(W_B)>, i.e. bring B as
close as possible to A in weight space. Coordinate descent: start from the identity, visit
the permutations in random order, and solve each one exactly as a linear assignment with
every other permutation held fixed; stop after a full sweep that improves nothing.

Devices: the float64 cost matrices (the O(n^2 d) part) are built on ``device``; the assignment
itself is scipy's ``linear_sum_assignment`` and always runs on the CPU (one n x n copy per solve).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import Field
from scipy.optimize import linear_sum_assignment

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from .derive import resolve_spec
from .spec import PermutationSpec, apply_permutation, permute_tensor, units_view

StateDict = dict[str, torch.Tensor]


class WeightMatchingConfig(MethodConfig):
    max_iter: int = Field(100, gt=0, description="full sweeps over the permutations (the reference's cap)")
    seed: int = Field(0, description="order in which the permutations are visited")
    include_buffers: bool = Field(False, description="let BatchNorm running statistics count in the match; the "
                                                      "reference matches parameters only")


@dataclass
class MatchResult:
    perms: dict[str, torch.Tensor]
    spec: PermutationSpec
    sweeps: int
    objective: float  # sum of <W_A, pi(W_B)> at the end
    objective_start: float  # same with identity permutations
    seconds: float
    history: list[float] = field(default_factory=list)


def _objective(spec: PermutationSpec, perms, a: StateDict, b: StateDict, names) -> float:
    pb = apply_permutation(spec, perms, {k: b[k] for k in names})
    return float(sum((a[k].double() * pb[k].double()).sum() for k in names))


def match_state_dicts(spec: PermutationSpec, a: StateDict, b: StateDict, cfg: WeightMatchingConfig | None = None,
                      skip: set[str] = frozenset(), init: dict[str, torch.Tensor] | None = None,
                      device=None) -> MatchResult:
    """Permutations of ``b`` into ``a``'s basis; tensors in ``skip`` do not count in the cost.

    ``device``: where the float64 costs are built (None: the CPU; MPS has no float64). The
    permutations come back as CPU index tensors.
    """
    from ..engine.placement import float64_device

    dev = float64_device(device)
    cfg = cfg or WeightMatchingConfig()
    spec.validate(a)
    for k in spec.axes():
        if k not in b or a[k].shape != b[k].shape:
            raise ConfigError(f"tensor '{k}' has shape {list(a[k].shape)} in A but "
                              f"{list(b[k].shape) if k in b else 'is missing'} in B: "
                              f"the models must share one architecture")
    t0 = time.perf_counter()
    axes = spec.axes()
    used = [k for k in axes if k not in skip and a[k].is_floating_point()]
    perms = {p: (init[p].clone().cpu() if init and p in init else torch.arange(n)) for p, n in spec.sizes.items()}
    fa = {k: a[k].to(dev).double() for k in used}
    fb = {k: b[k].to(dev).double() for k in used}
    start = _objective(spec, perms, fa, fb, used)
    rng = np.random.default_rng(cfg.seed)
    names = list(spec.groups)
    history, sweeps = [], 0
    for sweeps in range(1, cfg.max_iter + 1):
        improved = False
        for i in rng.permutation(len(names)):
            p = names[i]
            n = spec.sizes[p]
            cost = torch.zeros(n, n, dtype=torch.float64, device=dev)
            for t, ax in spec.groups[p]:
                if t not in fa:
                    continue
                wb = permute_tensor(axes, perms, t, fb[t], except_axis=ax)
                cost += units_view(fa[t], ax, n) @ units_view(wb, ax, n).T
            c = cost.cpu().numpy()  # scipy's assignment runs on the CPU
            _, col = linear_sum_assignment(c, maximize=True)
            old = c[np.arange(n), perms[p].numpy()].sum()
            new = c[np.arange(n), col].sum()
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[p] = torch.as_tensor(col, dtype=torch.long)
                improved = True
        history.append(_objective(spec, perms, fa, fb, used))
        if not improved:
            break
    return MatchResult(perms, spec, sweeps, history[-1] if history else start, start,
                       time.perf_counter() - t0, history)


@register("align", "weight-matching", kind="whole", config=WeightMatchingConfig, regime=Regime.WHOLE_MODEL,
          paper="Git Re-Basin: Merging Models modulo Permutation Symmetries (Ainsworth et al., 2023)",
          summary="permute B's hidden units into A's basis by coordinate descent over linear assignments")
def weight_matching(model_a: torch.nn.Module, model_b: torch.nn.Module, spec="auto",
                    cfg: WeightMatchingConfig | None = None, example=None, device=None,
                    **params) -> tuple[torch.nn.Module, dict]:
    """Return (B permuted into A's basis as a new module, {perm name: index tensor}).

    ``spec``: "auto" (derived from A's structure, or the hand spec for HF Llama/BERT), a
    PermutationSpec, a dict, or a JSON/YAML file; ``example`` (an input batch) is only needed
    by "auto" for models torch.fx cannot trace, and guessed from the first layer if omitted.
    The permuted B computes the same function
    as B wherever the spec permutes only hidden units (outputs of the spec's frozen groups
    are unchanged).
    """
    cfg = cfg or WeightMatchingConfig(**params)
    if type(model_a) is not type(model_b):
        raise ConfigError(f"A is a {type(model_a).__name__} but B is a {type(model_b).__name__}; "
                          f"weight matching needs one architecture")
    s = resolve_spec(model_a, spec, example)
    buffers = set() if cfg.include_buffers else {k for k, _ in model_a.named_buffers()}
    res = match_state_dicts(s, model_a.state_dict(), model_b.state_dict(), cfg, skip=buffers, device=device)
    return permuted_copy(model_b, s, res.perms), res.perms


def match(model_a, model_b, spec="auto", cfg: WeightMatchingConfig | None = None, example=None,
          device=None) -> MatchResult:
    """Like weight_matching but returns the full MatchResult (objective, sweeps, time)."""
    cfg = cfg or WeightMatchingConfig()
    s = resolve_spec(model_a, spec, example)
    buffers = set() if cfg.include_buffers else {k for k, _ in model_a.named_buffers()}
    return match_state_dicts(s, model_a.state_dict(), model_b.state_dict(), cfg, skip=buffers, device=device)


def permuted_copy(model: torch.nn.Module, spec: PermutationSpec, perms: dict[str, torch.Tensor]) -> torch.nn.Module:
    out = copy.deepcopy(model)
    sd = apply_permutation(spec, perms, model.state_dict())
    out.load_state_dict({k: v.clone() for k, v in sd.items()})
    return out
