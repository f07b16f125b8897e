"""Per-tensor statistics over a whole checkpoint (streaming: one tensor in memory at a time)."""
from __future__ import annotations

from pydantic import Field

from ..engine.progress import progress
from ..io.dtypes import dtype_name
from ..registry import MethodConfig, Regime, register
from ..tensor.stats import tensor_stats


class StatsConfig(MethodConfig):
    top: int = Field(10, ge=0, description="how many tensors with the largest norm to list in the summary")


@register("inspect", "stats", paper="(elementary statistics; no paper)", config=StatsConfig,
          regime=Regime.STREAMING, kind="report",
          summary="per-tensor numel, mean, std, abs max, norm, zero share, NaN/Inf counts")
def stats(source, cfg: StatsConfig = StatsConfig(), show_progress: bool | None = None) -> dict:
    layers = []
    for name in progress(source.names(), "tensor statistics", enabled=show_progress):
        info = source.info(name)
        row = {"name": name, "shape": list(info.shape), "dtype": dtype_name(info.dtype)}
        row.update(tensor_stats(source.get(name)))
        layers.append(row)
    bad = [r["name"] for r in layers if r["nan"] or r["inf"]]
    largest = sorted(layers, key=lambda r: -r["norm"] if r["norm"] == r["norm"] else 0)[: cfg.top]
    summary = {
        "tensors": len(layers),
        "parameters": sum(r["numel"] for r in layers),
        "nonfinite_tensors": bad,
        "largest_norm": [{"name": r["name"], "norm": r["norm"]} for r in largest],
        "zero_share": (sum(r["zeros"] * r["numel"] for r in layers) / max(1, sum(r["numel"] for r in layers))),
    }
    return {"layers": layers, "summary": summary}
