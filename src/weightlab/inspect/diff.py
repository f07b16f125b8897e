"""What a fine-tune or a compression changed, matrix by matrix, against a base checkpoint."""
from __future__ import annotations

from pydantic import Field

from ..registry import Regime, register
from .analysis import DiffOptions, InspectConfig, as_source, run


class DiffConfig(InspectConfig):
    base: str = Field(..., description="the base checkpoint: a path or zoo:NAME")
    k: int = Field(10, ge=1, description="top-k left singular vectors of the fine-tuned matrix checked for intruders")
    eps: float = Field(0.5, gt=0, le=1, description="intruder if max |cos| with every base singular vector < eps")


@register("inspect", "diff", config=DiffConfig, regime=Regime.STREAMING, kind="report",
          paper="Shuttleworth et al., LoRA vs full fine-tuning: an illusion of equivalence (2024), intruder "
                "dimensions; Liu et al., How connectivity structure shapes rich and lazy learning in neural circuits (ICLR 2024), effective rank",
          summary="per matrix against a base: change norm and relative change, effective/numerical rank of the "
                  "change, intruder dimensions (top-k, eps), alignment with the base's top singular directions; "
                  "which layers (shallow or deep) changed most")
def diff(source, cfg: DiffConfig, show_progress: bool | None = None) -> dict:
    inner = InspectConfig(**cfg.model_dump(exclude={"base", "k", "eps"}))
    base = as_source(cfg.base, "base")
    try:
        res = run(source, inner, base, DiffOptions(k=cfg.k, eps=cfg.eps), show_progress=show_progress,
                  keep_spectra=False)
    finally:
        if callable(getattr(base, "close", None)):
            base.close()
    return {"diff": list(res.diff), "summary": res.summary["diff"]}
