"""Compress family: make weights smaller. Each method registers itself on import.

`prune(model, method=..., sparsity=...)` runs any registered pruning rule ("prune" kind)
with any sparsity allocation ("allocate" kind).
"""
from . import allocation, cast, dpruner, gblm, magnitude, sparsegpt, wanda  # noqa: F401  (register)
from .ap import dead_neuron_rate, iterative_prune
from .masks import MaskKeeper, SPDFSchedule, masks_from_zeros
from .rethinking import reinitialize_pruned
from .prune import PruneReport, prune, target_layers

__all__ = ["MaskKeeper", "PruneReport", "SPDFSchedule", "dead_neuron_rate", "iterative_prune", "masks_from_zeros",
           "prune", "reinitialize_pruned", "target_layers"]
