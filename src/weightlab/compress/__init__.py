"""Compress family: make weights smaller. Each method registers itself on import.

`prune(model, method=..., sparsity=...)` runs any registered pruning rule ("prune" kind)
with any sparsity allocation ("allocate" kind).
"""
from . import allocation, cast, dpruner, gblm, magnitude, sparsegpt, wanda  # noqa: F401  (register)
from . import awq, compensate, gptq, packed, pbllm, quantize, rtn, statsq  # noqa: F401  (register)
from .ap import dead_neuron_rate, iterative_prune
from .masks import MaskKeeper, SPDFSchedule, masks_from_zeros
from .rethinking import prune_channels, reinitialize_pruned, train_from_scratch
from .spdf import spdf
from .compensate import CompensateReport, compensate  # noqa: E402  (the functions shadow their modules)
from .prune import PruneReport, prune, target_layers
from .quantize import QuantReport, quantize

__all__ = ["CompensateReport", "MaskKeeper", "PruneReport", "QuantReport", "compensate", "quantize", "SPDFSchedule", "dead_neuron_rate", "iterative_prune", "masks_from_zeros",
           "prune", "prune_channels", "reinitialize_pruned", "spdf", "target_layers", "train_from_scratch"]
