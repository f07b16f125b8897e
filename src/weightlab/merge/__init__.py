"""Merge family: combine several models.

Per-tensor rules (linear, task arithmetic, TIES, DARE, TSV-M) run in the streaming engine;
greedy soups, signatures and weight aligning work on in-memory models or single tensors.
"""
from . import (  # noqa: F401  (register)
    breadcrumbs, dare, della, linear, model_stock, passthrough, slerp, soup, task_arithmetic, ties, tsv, weight_align)
from .api import merge
from .engine import MergeResult, run_merge
from .job import MergeJob, ModelRef

__all__ = ["MergeJob", "MergeResult", "ModelRef", "merge", "run_merge"]


class _CallableModule(type(__import__("sys"))):
    """`wl.merge(...)` calls merge(): the package and the function share one name."""

    def __call__(self, *args, **kwargs):
        return merge(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
