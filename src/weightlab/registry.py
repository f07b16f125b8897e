"""One registry for every family: name -> method, with its paper, config and memory regime.

A family module registers its methods on import with ``@register(...)``. The CLI,
recipes and ``weightlab methods`` resolve names only through here, so adding a method
is adding one file.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

FAMILIES = ("inspect", "adapt", "merge", "compress", "data", "align", "elastic")


@dataclass(frozen=True)
class NoContract:
    """A kind whose methods declare nothing beyond name, paper, config and regime."""


@dataclass(frozen=True)
class StepContract:
    workdir: bool = False  # the runner passes a scratch folder (workdir=...)
    first_step: bool = False  # makes the model (merge): only as a recipe's first step


@dataclass(frozen=True)
class MergeRuleContract:
    requires_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    inputs: tuple[int, int] | None = None  # (min, max) inputs counting the base (slerp: a base and one model)
    raw_inputs: bool = False  # the rule reads the inputs in their own dtype (no compute-dtype cast)
    device_capable: bool = False  # may compute on an accelerator (--device)
    prepare: Callable | None = None  # prepare(inputs, cfg) -> state, once before streaming
    check: Callable | None = None  # check(cfg, weights, densities) raises ConfigError before any output exists


@dataclass(frozen=True)
class MergeModelContract:
    job_runner: Callable | None = None  # runs a MergeJob itself (greedy soup): job_runner(job, cfg, out, force, ...)


@dataclass(frozen=True)
class PruneRuleContract:
    needs: Any = ()  # statistics: "norms", "hessian", "gradients"
    prepare: Callable | None = None  # a whole-model pass before the layers (D-Pruner)


@dataclass(frozen=True)
class QuantizerContract:
    default_bits: int = 4
    bits_range: tuple = (2, 8)
    needs: Any = ()  # ("hessian",) or a function of the config
    zero_level: bool = True  # 0 is on the grid: a pruned model's zeros can stay exact


@dataclass(frozen=True)
class AdapterContract:
    layers: str = ""  # the layer kinds it attaches to, for `weightlab methods`
    trainable: str = ""  # trainable parameters per layer


@dataclass(frozen=True)
class Kind:
    what: str
    contract: type = NoContract


KINDS = {
    "transform": Kind("recipe step that changes the model: f(source, cfg, ...) -> source", StepContract),
    "report": Kind("recipe step that reads the model: f(source, cfg, ...) -> JSON-able dict", StepContract),
    "merge": Kind("per-tensor merge rule f(tensors, base, ctx) -> tensor, run by the merge engine",
                  MergeRuleContract),
    "merge-model": Kind("whole-model merge with its own loop (soups, alignment merges, signatures)",
                        MergeModelContract),
    "prune": Kind("per-layer pruning rule f(ctx) -> (weight, mask), run by compress.prune", PruneRuleContract),
    "allocate": Kind("per-layer sparsity allocation f(layers, sparsity, ...) -> {layer: sparsity}"),
    "quantize": Kind("per-layer quantizer f(ctx) -> integer layer, run by compress.quantize", QuantizerContract),
    "adapter": Kind("adapter method (an AdapterMethod class) that adapt.attach puts on layers", AdapterContract),
    "score": Kind("per-sample data score from a model or training run"),
    "reweighter": Kind("per-sample loss reweighting during training"),
    "loss": Kind("robust per-token loss that replaces the plain mean"),
    "whole": Kind("works on in-memory models (training, search, analysis)"),
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
    contract: Any = field(default_factory=NoContract)  # the kind's typed facts (KINDS[kind].contract)

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
        **facts,
    ) -> Callable[[Callable], Callable]:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        try:
            contract = KINDS[kind].contract(**facts)
        except TypeError:
            allowed = [f.name for f in fields(KINDS[kind].contract)]
            raise ValueError(f"{family}/{name}: a '{kind}' method declares only {allowed or 'nothing'}, "
                             f"got {sorted(facts)}") from None

        def deco(fn: Callable) -> Callable:
            key = (family, name)
            if key in self._methods and self._methods[key].fn is not fn:
                raise ValueError(f"method {family}/{name} is registered twice")
            self._methods[key] = MethodSpec(family, name, fn, config, Regime(regime), paper, summary, kind,
                                           tuple(aliases), contract)
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
