"""How work is scheduled over a model: tensor streaming, evaluation, progress."""
from .progress import progress
from .source import MappedSource, StateDictSource, TensorSource
from .streaming import write_source

__all__ = ["MappedSource", "StateDictSource", "TensorSource", "progress", "write_source"]
