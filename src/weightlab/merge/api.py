"""Python entry points: ``wl.merge(...)`` and loading merge configs (weightlab or mergekit YAML)."""
from __future__ import annotations

import os

from ..configfile import build, read_yaml_mapping
from .engine import run_merge
from .job import MergeJob
from .mergekit import from_mergekit, is_mergekit


def merge(method: str, models: list, base=None, *, out: str | os.PathLike | None = None,
          weights: list[float] | None = None, densities: list[float | None] | None = None,
          dtype: str | None = None, seed: int = 0, force: bool = False, allow_nonfinite: bool = False,
          show_progress: bool | None = None, device: str = "cpu", **params):
    """Merge ``models`` (paths, Checkpoints or state dicts) with a registered merge method.

    Returns the merged state dict, or the output folder when ``out`` is given.
    ``params`` are the method's parameters (e.g. density=0.2, lambda_=1.0 or **{"lambda": 1.0}).
    ``device``: where ties, tsv-m and r-tsvm compute ('cpu', 'auto', 'cuda', 'cuda:N'); I/O stays on the CPU.
    """
    refs = []
    for i, m in enumerate(models):
        ref = {"path": str(getattr(m, "path", "")) if not isinstance(m, (str, os.PathLike)) else str(m)}
        if weights is not None:
            ref["weight"] = weights[i]
        if densities is not None:
            ref["density"] = densities[i]
        refs.append(ref)
    if "lambda_" in params:
        params["lambda"] = params.pop("lambda_")
    job = MergeJob(method=method, models=refs, base=None, params=params, dtype=dtype, seed=seed,
                   allow_nonfinite=allow_nonfinite, device=device)
    res = run_merge(job, out, force=force, show_progress=show_progress, models=models, base=base)
    return res.output if out is not None else res.state_dict


def load_merge_config(path: str | os.PathLike) -> MergeJob:
    data = read_yaml_mapping(path, "merge config")
    if is_mergekit(data):
        return from_mergekit(data)
    return build(MergeJob, data, f"merge config '{path}'")
