"""Which named adapters a model holds, which are active, and PEFT's per-layer rank/alpha patterns.

The model keeps ``_weightlab_adapters`` (name -> method, config, patterns, in attach order) and
``_weightlab_active`` (the active names) in its ``__dict__``; each :class:`AdapterLayer` holds the
adapters that target it and mirrors the active list. ``_weightlab_adapter`` (the first active
adapter's entry) is kept for code written when a model held one adapter.
"""
from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from ..errors import ConfigError
from .layer import AdapterLayer, AdapterMethod


def adapter_layers(model: nn.Module, name: str | None = None) -> dict[str, AdapterLayer]:
    """The model's adapter layers (by module name); with ``name``, those that hold adapter ``name``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer) and (name is None or name in m.methods)}


# -- named adapters on one model ---------------------------------------------------------------
def _infos(model: nn.Module) -> dict[str, dict]:
    """name -> {"method", "config", "rank_pattern", "alpha_pattern"}, in the order they were attached."""
    return model.__dict__.setdefault("_weightlab_adapters", {})


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters attached to the model, in the order they were attached."""
    return list(model.__dict__.get("_weightlab_adapters", {}))


def active_adapters(model: nn.Module) -> list[str]:
    return list(model.__dict__.get("_weightlab_active", []))


def adapter_info(model: nn.Module, name: str) -> dict:
    infos = model.__dict__.get("_weightlab_adapters", {})
    if name not in infos:
        raise ConfigError(f"the model has no adapter named '{name}' (attached: {list(infos) or 'none'})")
    return infos[name]


def _sync(model: nn.Module) -> None:
    """Each layer's active list and requires_grad from the model's; ``_weightlab_adapter`` (the first active
    adapter's info, what single-adapter code reads) kept up to date."""
    infos = model.__dict__.get("_weightlab_adapters", {})
    act = [n for n in active_adapters(model) if n in infos]
    model.__dict__["_weightlab_active"] = act
    for lay in adapter_layers(model).values():
        lay.set_active(act)
        for n in lay.methods:
            for p in lay.adapter_module(n).parameters():
                p.requires_grad_(n in act)
    if infos:
        model._weightlab_adapter = infos[act[0] if act else next(iter(infos))]
    else:
        for k in ("_weightlab_adapters", "_weightlab_active", "_weightlab_adapter"):
            model.__dict__.pop(k, None)


def set_active(model: nn.Module, names: str | list[str]) -> nn.Module:
    """Make ``names`` (one name or a list) the active adapters: only they contribute to the forward, and
    only their tensors require grad (``trainable_parameters``); the others stay attached, frozen."""
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        adapter_info(model, n)
    model.__dict__["_weightlab_active"] = list(dict.fromkeys(names))
    _sync(model)
    return model


def _resolve(model: nn.Module, name) -> list[str]:
    """``name`` (str or list) checked, or the active adapters when None."""
    if name is None:  # (layers built without attach have no model-level names: their own active ones)
        return (active_adapters(model) or adapter_names(model)[:1] or
                sorted({a for lay in adapter_layers(model).values() for a in lay.active}))
    names = [name] if isinstance(name, str) else list(name)
    for n in names:
        adapter_info(model, n)
    return names


def _one(model: nn.Module, name: str | None) -> str:
    """One adapter: ``name``, else the only one attached, else the only active one."""
    if name is not None:
        adapter_info(model, name)
        return name
    names, act = adapter_names(model), active_adapters(model)
    if len(names) == 1 or len(act) == 1:
        return names[0] if len(names) == 1 else act[0]
    if not names:
        raise ConfigError("the model has no adapter attached")
    raise ConfigError(f"the model holds adapters {names} ({len(act)} active): say which one with name=")


# -- rank_pattern / alpha_pattern (PEFT's matching) -------------------------------------------
def pattern_key(keys: Iterable[str], module_name: str) -> str | None:
    """The first key that matches the module name as PEFT's ``get_pattern_key``: the key is a regex that
    must match the whole name or a dotted suffix of it."""
    for k in keys:
        if re.match(rf"(.*\.)?({k})$", module_name):
            return k
    return None


def layer_config(cfg, module_name: str, rank_pattern: dict | None, alpha_pattern: dict | None):
    """The method config of one layer: r / alpha replaced where a pattern matches its name."""
    upd = {}
    if rank_pattern and (k := pattern_key(rank_pattern, module_name)) is not None:
        upd["r"] = int(rank_pattern[k])
    if alpha_pattern and (k := pattern_key(alpha_pattern, module_name)) is not None:
        upd["alpha"] = float(alpha_pattern[k])
    return cfg.model_copy(update=upd) if upd else cfg


def _check_patterns(spec, cfg, names: list[str], rank_pattern, alpha_pattern) -> None:
    fields = type(cfg).model_fields
    for label, pat, field in (("rank_pattern", rank_pattern, "r"), ("alpha_pattern", alpha_pattern, "alpha")):
        if not pat:
            continue
        if field not in fields:
            raise ConfigError(f"{label} needs a method with '{field}'; '{spec.name}' has none")
        if label == "rank_pattern" and getattr(spec.fn, "prepare", None) is not None and \
                spec.fn.prepare.__func__ is not AdapterMethod.prepare.__func__:
            raise ConfigError(f"rank_pattern: '{spec.name}' shares state sized by r across layers; one r only")
        for k, v in pat.items():
            try:
                re.compile(k)
            except re.error as e:
                raise ConfigError(f"{label} key {k!r} is not a valid regex: {e}") from None
            if not isinstance(v, (int, float)) or v <= 0 or (field == "r" and int(v) != v):
                raise ConfigError(f"{label}[{k!r}] = {v!r}: expected a positive {'integer' if field == 'r' else 'number'}")
            if not any(pattern_key([k], n) for n in names):
                raise ConfigError(f"{label} key {k!r} matches none of the targets ({names[:3]}...)")
