"""Resolve model references: a path, or ``zoo:NAME`` for the offline zoo's models."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

ZOO_MODELS = ("smollm2", "smollm2-bf16", "minilm")


def resolve_model(ref: str) -> Path:
    if not ref.startswith("zoo:"):
        return Path(ref).expanduser()
    name = ref[4:]
    from .. import zoo

    if name == "smollm2":
        return zoo.smollm2()
    if name == "smollm2-bf16":
        return zoo.smollm2(dtype="bfloat16")
    if name == "minilm":
        return zoo.minilm()
    raise ConfigError(f"unknown zoo model '{name}'; known: {', '.join('zoo:' + m for m in ZOO_MODELS)}")
