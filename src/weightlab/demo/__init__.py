"""`weightlab demo`: the whole of weightlab on SmolLM2-135M, offline.

Each family adds one section (a function in ``sections.py``-style modules) that takes the
shared context and returns (json-able result, markdown). Sections run in order; the
result folder is written atomically.
"""
from .run import DemoContext, run_demo

__all__ = ["DemoContext", "run_demo"]
