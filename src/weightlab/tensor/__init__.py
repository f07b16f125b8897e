"""Pure math on tensors (no modules, no files): statistics, later SVD, masks, solvers."""
from .stats import tensor_stats

__all__ = ["tensor_stats"]
from .linalg import excess_kurtosis, polar_factor
from .masks import kth_largest_abs, kth_threshold_mask, random_keep_mask, topk_mask

__all__ += ["excess_kurtosis", "kth_largest_abs", "kth_threshold_mask", "polar_factor", "random_keep_mask",
            "topk_mask"]
