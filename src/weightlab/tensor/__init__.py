"""Pure math on tensors (no modules, no files): statistics, later SVD, masks, solvers."""
from .stats import tensor_stats

__all__ = ["tensor_stats"]
