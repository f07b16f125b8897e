"""Checks of a merge job that run before any input is read or any output exists: how many models the
rule takes, the slices' bases, and every tensor's parameter values when they vary per tensor."""
from __future__ import annotations

from ..errors import ConfigError
from .params import TensorParams


def count_check(spec, n_models: int, has_base: bool) -> None:
    c = spec.contract
    if c.min_models > n_models:
        raise ConfigError(f"merge method '{spec.name}' needs at least {c.min_models} models")
    if c.max_models is not None and n_models > c.max_models:
        raise ConfigError(f"merge method '{spec.name}' takes at most {c.max_models} models, got {n_models}")
    n = n_models + has_base
    if c.inputs is not None and not c.inputs[0] <= n <= c.inputs[1]:
        lo, hi = c.inputs
        want = str(lo) if lo == hi else f"{lo} to {hi}"
        raise ConfigError(f"merge method '{spec.name}' takes {want} inputs counting the base, got {n} "
                          f"({n_models} model(s){' and a base' if has_base else ''})")


def slice_checks(spec, job) -> None:
    """Per slice: the number of sources the method takes, and a base where it needs one."""
    for k, sl in enumerate(job.slices):
        b = sl.base or job.base
        has_base = b is not None and any(s.key == b for s in sl.sources)
        if spec.contract.requires_base and not has_base:
            raise ConfigError(f"slices[{k}]: merge method '{spec.name}' needs a base among the slice's sources "
                              f"(base: {b or 'not set'})")
        try:
            count_check(spec, len(sl.sources) - has_base, has_base)
        except ConfigError as e:
            raise ConfigError(f"slices[{k}]: {e}") from None


def check_per_tensor(spec, job, params: TensorParams, plan) -> None:
    """With per-layer or per-name settings: every tensor's values are valid before anything is merged."""
    seen = set()
    for tp in plan:
        if not tp.merged:
            continue
        cfg = params.config(tp.name, tp.t, tp.slice_params)
        refs = tp.refs or job.models
        vals = [params.model_values(r, own, tp.t, tp.slice_params)[:2] for r, own in zip(refs, tp.sources)]
        weights, densities = [v[0] for v in vals], [v[1] for v in vals]
        key = (id(cfg), tuple(weights), tuple(densities))
        if spec.contract.check is not None and key not in seen:
            seen.add(key)
            try:
                spec.contract.check(cfg, weights, densities)
            except ConfigError as e:
                raise ConfigError(f"{e} (tensor {tp.name})") from None
