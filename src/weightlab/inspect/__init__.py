"""Inspect family: what is in a model's weights. Each method registers itself on import.

``analyze(model_or_path, base=None)`` runs the spectral, filter and diff diagnostics in one
streaming pass and returns a table of per-layer rows (see ``weightlab.inspect.analysis``).
"""
from . import diff, filters, spectral, stats  # noqa: F401
from . import heads, internals_html, neurons  # noqa: F401  (LLM neurons through the LM head; sinks, dormant heads)
from .analysis import InspectConfig, InspectResult, Table, analyze

__all__ = ["InspectConfig", "InspectResult", "Table", "analyze"]
