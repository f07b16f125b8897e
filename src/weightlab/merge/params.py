"""The parameters one tensor is merged with: method settings and each model's weight, density and params.

Precedence (as mergekit reads its configs): a model's own value > its slice's ``params`` > the job's
``params`` > the method's default. Every value may be a gradient over the layers or a list of name filters
(schedule.py); it is evaluated for the tensor's name (a model's own name for its per-model values) and its
layer position t. Without such settings and slices everything is computed once (the static case).
"""
from __future__ import annotations

from ..errors import ConfigError
from . import schedule

MODEL_KEYS = ("weight", "density")


class TensorParams:
    def __init__(self, spec, job):
        self.spec, self.job = spec, job
        self.fields = set()
        for name, f in spec.config.model_fields.items():
            self.fields |= {name, f.alias or name}
        refs = [m for sl in job.slices or [] for m in sl.sources] or job.models
        levels = [job.params, *[s.params for s in job.slices or []], *[m.params for m in refs]]
        unknown = sorted({k for lv in levels for k in lv if k not in self.fields and k not in MODEL_KEYS})
        if unknown:
            raise ConfigError(f"merge/{spec.name} has no parameter(s) {', '.join(map(repr, unknown))}; its parameters: "
                              f"{', '.join(sorted(spec.defaults()))}")
        settings = [*job.params.values(), *[x for m in refs for x in (m.weight, m.density)]]
        self.static = not (job.slices or any(m.params for m in refs)
                           or any(k in MODEL_KEYS and k not in self.fields for k in job.params)
                           or any(schedule.is_schedule(v) for v in settings))
        self._cfgs: dict = {}
        self.cfg = spec.make_config(self._method_params([job.params], "", 0.0)) if self.static else None

    def _method_params(self, levels: list[dict], name: str, t: float) -> dict:
        out = {}
        for key in {k for lv in levels for k in lv}:
            if key not in self.fields:
                continue  # weight/density set for every model at this level
            v = schedule.first([schedule.evaluate(lv[key], name, t) for lv in levels if key in lv], None)
            if v is not None:
                out[key] = v
        return out

    def config(self, name: str, t: float, slice_params: dict | None = None):
        """The method's config for one tensor (built once per distinct set of values)."""
        if self.static:
            return self.cfg
        levels = [p for p in (slice_params, self.job.params) if p]
        params = self._method_params(levels, name, t)
        key = tuple(sorted((k, repr(v)) for k, v in params.items()))
        if key not in self._cfgs:
            try:
                self._cfgs[key] = self.spec.make_config(params)
            except ConfigError as e:
                raise ConfigError(f"{e} (for tensor {name!r})") from None
        return self._cfgs[key]

    def model_values(self, ref, own_name: str, t: float, slice_params: dict | None = None):
        """(weight, density, other per-model params) of one model for one tensor."""
        levels = [p for p in (slice_params, self.job.params) if p]
        vals = {}
        for key in MODEL_KEYS:
            own = getattr(ref, key) if key in ref.model_fields_set else None
            cands = [schedule.evaluate(own, own_name, t)] if own is not None else []
            cands += [schedule.evaluate(lv[key], own_name, t) for lv in levels if key in lv and key not in self.fields]
            vals[key] = schedule.first(cands, None)
        weight = 1.0 if vals["weight"] is None else float(vals["weight"])
        density = vals["density"]
        if density is not None and not 0 < float(density) <= 1:
            raise ConfigError(f"density {density!r} for {own_name!r} of {ref.path} must be in (0, 1]")
        extra = {k: schedule.evaluate(v, own_name, t) for k, v in ref.params.items()}
        return weight, (None if density is None else float(density)), {k: v for k, v in extra.items() if v is not None}
