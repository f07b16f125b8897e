"""Putting models and tensors where ``engine.device`` says (the policy itself lives there, not here).

Whole-model commands (heads, neurons, score-data, align, tune) move the model once and feed it
inputs on its device; tensor-streaming paths (inspect, merge rules) move one tensor at a time.
Results always come back to the CPU so reports, tables and written files never hold device tensors.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .device import resolve_device


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s parameters live (the CPU for a parameterless module)."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def place(model: torch.nn.Module, device=None, dtype: torch.dtype | None = None) -> torch.device:
    """Move ``model`` in place to ``device`` (and ``dtype``); None keeps it where it is. Returns its device."""
    if device is None and dtype is None:
        return model_device(model)
    dev = resolve_device(device) if device is not None else model_device(model)
    model.to(device=dev, dtype=dtype) if dtype is not None else model.to(dev)
    return dev


def float64_device(spec=None) -> torch.device:
    """The device for float64 linear algebra (Gram matrices, eigenvalues, k-means, assignment costs).

    MPS has no float64: 'auto' then means the CPU, and an explicit 'mps' is one clear error
    rather than silently different numbers.
    """
    if spec is None:
        return torch.device("cpu")
    explicit = not (isinstance(spec, str) and spec.strip().lower() == "auto")
    dev = resolve_device(spec)
    if dev.type == "mps":
        if explicit:
            raise ConfigError("this computation needs float64, which MPS (Apple GPU) does not support; "
                              "use --device cpu (or cuda)")
        return torch.device("cpu")
    return dev


def on_device(dev: torch.device | None) -> bool:
    """True when ``dev`` is an accelerator (the CPU paths stay the reference numpy/torch code)."""
    return dev is not None and dev.type != "cpu"
