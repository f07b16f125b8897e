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


def load_model_from(source, dtype: torch.dtype = torch.float32):
    """(causal LM, tokenizer) holding the tensors of ``source`` as it is now.

    A recipe step receives the model as the previous step left it (a pruned model stays pruned):
    the architecture, config and tokenizer come from the checkpoint the source was read from,
    every weight the source has is then taken from the source itself.
    """
    from ..errors import ConfigError
    from ..io.hf import load_causal_lm

    path = root_path(source)
    if path is None:
        raise ConfigError("this step needs a model folder (a checkpoint with config.json)")
    model, tok = load_causal_lm(path, dtype=dtype)
    if getattr(source, "inner", None) is None:
        return model, tok  # the checkpoint itself: nothing changed since it was read
    sd = model.state_dict()
    with torch.no_grad():
        for name in source.names():
            if name in sd:
                sd[name].copy_(source.get(name).to(sd[name].dtype))
    return model, tok


def step_folder(source) -> Path:
    """The folder a recipe step reads: the runner hands every step a written checkpoint."""
    from ..errors import ConfigError

    path = root_path(source)
    if path is None or getattr(source, "inner", None) is not None:
        raise ConfigError("this step reads a model folder; run it in a recipe (the runner writes each step's model)")
    return path
