"""Tensor sources: anything with names(), info(name) and get(name).

A Checkpoint is one; streaming transforms wrap a source lazily so a recipe of several
streaming steps still reads each input tensor once and holds one tensor at a time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch

from ..io.reader import TensorInfo


@runtime_checkable
class TensorSource(Protocol):
    def names(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def get(self, name: str) -> torch.Tensor: ...


class MappedSource:
    """Apply ``fn(name, tensor) -> tensor`` lazily; ``info_fn`` predicts the new info without reading."""

    def __init__(self, inner, fn: Callable[[str, torch.Tensor], torch.Tensor],
                 info_fn: Callable[[TensorInfo], TensorInfo] | None = None):
        self.inner = inner
        self.fn = fn
        self.info_fn = info_fn or (lambda i: i)
        self.config = getattr(inner, "config", None)
        self.path: Path | None = getattr(inner, "path", None)

    def names(self) -> list[str]:
        return self.inner.names()

    def info(self, name: str) -> TensorInfo:
        return self.info_fn(self.inner.info(name))

    def get(self, name: str) -> torch.Tensor:
        return self.fn(name, self.inner.get(name))


class StateDictSource:
    """An in-memory state dict seen as a source."""

    def __init__(self, state_dict: dict[str, torch.Tensor], config: dict | None = None, path: Path | None = None):
        self.sd = state_dict
        self.config = config
        self.path = path

    def names(self) -> list[str]:
        return list(self.sd)

    def info(self, name: str) -> TensorInfo:
        t = self.sd[name]
        return TensorInfo(name, tuple(t.shape), t.dtype, "<memory>")

    def get(self, name: str) -> torch.Tensor:
        return self.sd[name]


def root_path(source) -> Path | None:
    """The checkpoint path a (possibly wrapped) source was read from."""
    while source is not None:
        p = getattr(source, "path", None)
        if p is not None:
            return Path(p)
        source = getattr(source, "inner", None)
    return None
