"""One registry for every family: name -> method, with its paper, config and memory regime.

A family module registers its methods on import with ``@register(...)``. The CLI,
recipes and ``weightlab methods`` resolve names only through here, so adding a method
is adding one file.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

FAMILIES = ("inspect", "adapt", "merge", "compress", "data", "align")
KINDS = {
    "transform": "takes a tensor source, returns a new source (lazily)",
    "report": "takes a tensor source, returns a JSON-able dict",
    "merge": "per-tensor rule f(tensors, base, ctx) -> tensor, run by the merge engine",
    "whole": "works on in-memory models or state dicts (training, search)",
    "prune": "per-layer pruning rule f(ctx) -> (weight, mask), run by compress.prune",
    "allocate": "per-layer sparsity allocation f(layers, sparsity, ...) -> {layer: sparsity}",
    "quantize": "per-layer quantizer f(ctx) -> integer layer, run by compress.quantize",
}


class Regime(str, Enum):
    STREAMING = "streaming"  # one tensor per input at a time, never builds the model
    LAYERWISE = "layerwise"  # one block at a time with calibration activations
    WHOLE_MODEL = "whole-model"  # full model in memory (training, alignment)


class MethodConfig(BaseModel):
    """Base for method configs: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, populate_by_name=True)


class NoConfig(MethodConfig):
    pass


@dataclass(frozen=True)
class MethodSpec:
    family: str
    name: str
    fn: Callable[..., Any]
    config: type[BaseModel]
    regime: Regime
    paper: str
    summary: str
    kind: str = "transform"  # see KINDS
    aliases: tuple[str, ...] = field(default_factory=tuple)
    extra: dict = field(default_factory=dict)  # family-specific facts, e.g. a merge's "requires_base"

    def make_config(self, params: dict | None = None) -> BaseModel:
        try:
            return self.config(**(params or {}))
        except ValidationError as e:
            from .configfile import describe_validation_error

            raise ConfigError(f"invalid parameters for {self.family}/{self.name}: {describe_validation_error(e)}") from None

    def defaults(self) -> dict:
        out = {}
        for name, f in self.config.model_fields.items():
            if not f.is_required():
                d = f.get_default(call_default_factory=True)
                out[f.alias or name] = d.value if isinstance(d, Enum) else d
        return out


class Registry:
    def __init__(self) -> None:
        self._methods: dict[tuple[str, str], MethodSpec] = {}
        self._aliases: dict[tuple[str, str], str] = {}

    def register(
        self,
        family: str,
        name: str,
        *,
        paper: str,
        summary: str,
        config: type[BaseModel] = NoConfig,
        regime: Regime = Regime.STREAMING,
        kind: str = "transform",
        aliases: tuple[str, ...] = (),
        **extra,
    ) -> Callable[[Callable], Callable]:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")

        def deco(fn: Callable) -> Callable:
            key = (family, name)
            if key in self._methods and self._methods[key].fn is not fn:
                raise ValueError(f"method {family}/{name} is registered twice")
            self._methods[key] = MethodSpec(family, name, fn, config, Regime(regime), paper, summary, kind,
                                           tuple(aliases), dict(extra))
            for a in aliases:
                self._aliases[(family, a)] = name
            return fn

        return deco

    def get(self, family: str, name: str) -> MethodSpec:
        load_families()
        if family not in FAMILIES:
            raise ConfigError(f"unknown family '{family}'; families are: {', '.join(FAMILIES)}")
        name = self._aliases.get((family, name), name)
        try:
            return self._methods[(family, name)]
        except KeyError:
            known = sorted(n for f, n in self._methods if f == family)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown {family} method '{name}'.{hint} Known {family} methods: {', '.join(known) or 'none yet'}"
            ) from None

    def list(self, family: str | None = None) -> list[MethodSpec]:
        load_families()
        if family is not None and family not in FAMILIES:
            raise ConfigError(f"unknown family '{family}'; families are: {', '.join(FAMILIES)}")
        specs = [s for s in self._methods.values() if family is None or s.family == family]
        return sorted(specs, key=lambda s: (FAMILIES.index(s.family), s.name))


REGISTRY = Registry()
register = REGISTRY.register
get_method = REGISTRY.get
list_methods = REGISTRY.list

_loaded = False


def load_families() -> None:
    """Import every module of every family package, so each method registers itself.

    Every module, not only those the package's ``__init__`` happens to import: a method file that
    nothing imports would otherwise be silently missing from ``weightlab methods``.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    import pkgutil

    for fam in FAMILIES:
        pkg = importlib.import_module(f"weightlab.{fam}")
        for info in pkgutil.walk_packages(pkg.__path__, f"weightlab.{fam}."):
            importlib.import_module(info.name)
