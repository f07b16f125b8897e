"""Elementary per-tensor statistics, computed in float64 for stable sums."""
from __future__ import annotations

import torch


def tensor_stats(t: torch.Tensor) -> dict:
    """numel, mean, std, abs max, Frobenius norm, share of exact zeros, NaN and Inf counts."""
    n = t.numel()
    out = {"numel": n, "nan": 0, "inf": 0}
    if n == 0:
        return {**out, "mean": 0.0, "std": 0.0, "absmax": 0.0, "norm": 0.0, "zeros": 0.0}
    x = t.detach().to(torch.float64)
    if t.is_floating_point():
        finite = torch.isfinite(x)
        out["nan"] = int(torch.isnan(x).sum())
        out["inf"] = int(torch.isinf(x).sum())
        x = x[finite] if not bool(finite.all()) else x
    if x.numel() == 0:
        return {**out, "mean": float("nan"), "std": float("nan"), "absmax": float("nan"), "norm": float("nan"),
                "zeros": 0.0}
    return {**out, "mean": float(x.mean()), "std": float(x.std(unbiased=False)), "absmax": float(x.abs().max()),
            "norm": float(torch.linalg.vector_norm(x)), "zeros": float((x == 0).sum()) / n}
