"""Per-tensor parameter values: scalars, gradients over the layers, and name filters (mergekit's settings).

A setting is one of
  - a scalar (the same value for every tensor),
  - a list of numbers, a "gradient": its points are spread evenly over the layers and each layer takes the
    linear interpolation at its position t = layer / (layers - 1) (tensors outside the layers take t = 0),
  - a list of ``{filter: TEXT, value: SETTING}`` entries: the first whose filter occurs in the tensor's name
    (or that has no filter, or ``*``) decides; a tensor no entry matches falls back to the next level.
"""
from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError

LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")


def is_schedule(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def check(value: Any, where: str) -> None:
    """Refuse a malformed setting before any tensor is read."""
    if not is_schedule(value):
        return
    if not value:
        raise ConfigError(f"{where}: an empty list; give a number, a gradient [a, b, ...] or filter entries")
    if all(isinstance(v, dict) for v in value):
        for i, e in enumerate(value):
            bad = sorted(set(e) - {"filter", "value"})
            if bad or "value" not in e:
                raise ConfigError(f"{where}[{i}]: a filter entry is {{filter: TEXT, value: SETTING}}, got {e!r}")
            if e.get("filter") is not None and not isinstance(e["filter"], str):
                raise ConfigError(f"{where}[{i}].filter must be text, got {e['filter']!r}")
            check(e["value"], f"{where}[{i}].value")
        return
    if any(isinstance(v, (dict, list, tuple)) for v in value):
        raise ConfigError(f"{where}: mixes filter entries and plain values ({value!r})")


def leaves(value: Any):
    """Every plain value a setting holds (to type- and range-check them all before merging)."""
    if isinstance(value, dict):
        yield from leaves(value.get("value"))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from leaves(v)
    else:
        yield value


def evaluate(value: Any, name: str, t: float) -> Any:
    """The value of a setting for tensor ``name`` at layer position ``t`` (None: no filter entry matched)."""
    if not is_schedule(value):
        return value
    if all(isinstance(v, dict) for v in value):
        for e in value:
            f = e.get("filter")
            if f is None or f == "*" or (name and f in name):
                return evaluate(e["value"], name, t)
        return None
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        x = t * (len(value) - 1)
        i0 = int(x)
        i1 = min(len(value) - 1, i0 + 1)
        frac = x - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    return value[int(t * (len(value) - 1))]


def first(values: list, default: Any) -> Any:
    """The first value that is not None (slice source > slice > global, as mergekit reads them)."""
    for v in values:
        if v is not None:
            return v
    return default


def layer_index(name: str) -> int | None:
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_positions(names: list[str]) -> dict[str, float]:
    """t for every tensor: its layer's place among the layers (0 .. 1); 0 outside the layers."""
    idx = {n: layer_index(n) for n in names}
    layers = sorted({i for i in idx.values() if i is not None})
    n = (max(layers) + 1) if layers else 0
    return {name: (0.0 if i is None else (i / (n - 1) if n > 1 else 1.0)) for name, i in idx.items()}
