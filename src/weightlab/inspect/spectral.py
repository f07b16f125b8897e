"""WeightWatcher-style spectral diagnostics per weight matrix (streaming, threads across layers)."""
from __future__ import annotations

from ..registry import Regime, register
from .analysis import InspectConfig, run


@register("inspect", "spectral", config=InspectConfig, regime=Regime.STREAMING, kind="report",
          paper="Martin & Mahoney, Implicit self-regularization in deep neural networks (JMLR 2021); "
                "Martin, Peng & Mahoney, Predicting trends in the quality of state-of-the-art neural networks "
                "without access to training or testing data (Nature Communications 2021)",
          summary="per matrix: norms, stable/effective/numerical rank, power-law alpha of the eigenvalue spectrum "
                  "(MLE, xmin by minimum KS distance, as WeightWatcher), alpha_weighted, MP bulk edge and spikes, "
                  "warnings; conv filter quality")
def spectral(source, cfg: InspectConfig = InspectConfig(), show_progress: bool | None = None) -> dict:
    res = run(source, cfg, show_progress=show_progress, keep_spectra=False)
    d = res.to_dict()
    d.pop("diff")
    return d
