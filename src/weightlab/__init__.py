"""weightlab: inspect, adapt, merge and compress neural-network weights, and score the data behind them.

    import weightlab as wl
    ckpt = wl.open_checkpoint("path/to/model")     # lazy: names, shapes, dtypes
    w = ckpt.get("model.embed_tokens.weight")      # one tensor, memory-mapped
    wl.list_methods("compress")                    # every registered method
    wl.prune(model, "wanda", 0.5); wl.quantize(model, "gptq", 4)   # model first, then the method
    wl.tune(model, tokenizer, "lora"); wl.heads(model, tokenizer); wl.neurons(model)
    wl.load_merge_config("merge.yaml")             # mergekit or weightlab merge YAML -> MergeJob
"""
from __future__ import annotations

import importlib

from ._version import __version__
from .errors import (CheckpointError, ConfigError, CorruptCheckpointError, MissingDependencyError,
                     MissingShardError, OutputExistsError, TensorValueError, TruncatedCheckpointError,
                     UnsafeCheckpointError, UnsupportedFormatError, WeightlabError)
from .io import Checkpoint, CheckpointWriter, Provenance, open_checkpoint, save_state_dict
from .recipe import load_recipe, run_recipe
from .registry import Regime, get_method, list_methods, register

__all__ = [
    "Checkpoint", "CheckpointError", "CheckpointWriter", "ConfigError", "CorruptCheckpointError",
    "MissingDependencyError", "MissingShardError", "OutputExistsError", "Provenance", "Regime",
    "TensorValueError", "TruncatedCheckpointError", "UnsafeCheckpointError", "UnsupportedFormatError",
    "WeightlabError", "__version__", "get_method", "list_methods", "load_recipe", "open_checkpoint",
    "register", "run_recipe", "save_state_dict", "zoo",
    "tune", "heads", "neurons", "load_merge_config", "prune", "quantize", "compensate",
]

_LAZY = {"zoo", "engine", "inspect", "adapt", "merge", "compress", "data", "tensor", "align", "elastic"}
_LAZY_FUNCS = {  # the verbs, model first: op(model, method, **params)
    "tune": ("weightlab.adapt.training", "tune"),
    "heads": ("weightlab.inspect.heads", "analyze_heads"),
    "neurons": ("weightlab.inspect.neurons", "decode_neurons"),
    "load_merge_config": ("weightlab.merge.api", "load_merge_config"),
    "prune": ("weightlab.compress", "prune"),
    "quantize": ("weightlab.compress", "quantize"),
    "compensate": ("weightlab.compress", "compensate"),
}


def __getattr__(name: str):
    # heavy optional dependencies (transformers, gensim) load only when asked for
    if name in _LAZY:
        return importlib.import_module(f"weightlab.{name}")
    if name in _LAZY_FUNCS:
        mod, attr = _LAZY_FUNCS[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'weightlab' has no attribute {name!r}")
