"""Sources and the tensor plan of an inspect pass: which weight matrices, in which order, seen as what."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..engine.source import StateDictSource
from ..errors import ConfigError

if TYPE_CHECKING:
    from .analysis import InspectConfig

def as_source(obj: Any, what: str = "model"):
    """A tensor source from a path / zoo reference, a source, an nn.Module or a state dict."""
    if isinstance(obj, (str, os.PathLike)):
        from ..io.reader import open_checkpoint
        from ..io.refs import resolve_model

        return open_checkpoint(resolve_model(str(obj)))
    if all(hasattr(obj, a) for a in ("names", "info", "get")):
        return obj
    if isinstance(obj, torch.nn.Module):
        return StateDictSource(obj.state_dict())
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return StateDictSource(dict(obj))
    raise ConfigError(f"cannot inspect {what} of type {type(obj).__name__}: give a checkpoint path, 'zoo:NAME', "
                      "an nn.Module, a state dict or a tensor source")


def _aliases(source) -> dict[str, str]:
    """name -> first name sharing its storage (tied weights), for in-memory state dicts."""
    sd = getattr(source, "sd", None)
    if not isinstance(sd, dict):
        return {}
    seen: dict[tuple, str] = {}
    out = {}
    for n, t in sd.items():
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            out[n] = seen[key]
        else:
            seen[key] = n
    return out


@dataclass
class _Item:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    n: int  # WeightWatcher's N (longer side of a matrix / slice)
    m: int  # WeightWatcher's M
    rf: int  # receptive field (slices pooled), 1 for plain matrices
    cost: float
    tied_to: str | None = None


def _kind(name: str, ndim: int) -> str:
    if ndim == 4:
        return "conv2d"
    low = name.lower()
    return "embedding" if any(s in low for s in ("embed", "wte", "wpe", "shared.weight")) else "linear"


def plan(source, cfg: InspectConfig) -> tuple[list[_Item], list[dict], list[str]]:
    """(matrices to analyse, skipped matrices with reasons, other floating tensors)."""
    inc = re.compile(cfg.include) if cfg.include else None
    exc = re.compile(cfg.exclude) if cfg.exclude else None
    aliases = _aliases(source)
    items, skipped, others = [], [], []
    for name in source.names():
        info = source.info(name)
        if not info.dtype.is_floating_point or info.numel == 0:
            continue
        nd = len(info.shape)
        if nd not in (2, 4):
            if nd == 3 or nd > 4:
                skipped.append({"name": name, "reason": f"{nd}-D tensor (only 2-D matrices and 4-D conv kernels)"})
            others.append(name)
            continue
        if (inc and not inc.search(name)) or (exc and exc.search(name)):
            skipped.append({"name": name, "reason": "excluded by name pattern"})
            others.append(name)
            continue
        if nd == 2:
            a, b = info.shape
            n, m, rf = max(a, b), min(a, b), 1
            cost = n * m * m + 4 * m ** 3
        else:
            co, ci, kh, kw = info.shape
            n, m, rf = max(co, ci), min(co, ci), kh * kw
            mm = min(co, ci * rf)
            cost = rf * (n * m * m + 4 * m ** 3) + max(co, ci * rf) * mm * mm + 4 * mm ** 3
        evals = m * rf
        reason = None
        if evals < cfg.min_evals:
            reason = f"{evals} eigenvalues < min_evals {cfg.min_evals}"
        elif evals > cfg.max_evals:
            reason = f"{evals} eigenvalues > max_evals {cfg.max_evals}"
        elif n > cfg.max_n:
            reason = f"longer side {n} > max_n {cfg.max_n}"
        if reason:
            skipped.append({"name": name, "reason": reason})
            others.append(name)
            continue
        items.append(_Item(name, tuple(info.shape), info.dtype, _kind(name, nd), n, m, rf, float(cost),
                           aliases.get(name)))
    return items, skipped, others
