"""``analyze``: what is in a model's weights, and what a fine-tune or a compression changed.

One streaming pass: a pool of threads (one per core) takes the weight matrices largest
first; each worker reads one tensor (and its counterpart in the base), computes everything
below from one float64 Gram matrix, and lets the tensor go. The model is never built.

Per weight matrix (conv kernels viewed as c_out x c_in*k_h*k_w; their ESD is pooled over the
k_h*k_w slices as WeightWatcher does):
  norms and ranks (Frobenius, spectral, stable, effective, numerical, participation ratio),
  WeightWatcher's ESD metrics (alpha by MLE with xmin at the minimum KS distance, KS
  distance, alpha_weighted, log norms, number of power-law "spikes"), a Marchenko-Pastur
  bulk edge and its spikes, warnings; conv filter quality (CNN Filter DB) for spatial kernels.
With a base: size of the change, its effective/numerical rank, intruder dimensions, how much
of the change lies along the base's top singular directions, and where in depth it happened.
"""
from __future__ import annotations

import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import nullcontext

import numpy as np
from pydantic import Field, field_validator

from ..engine.progress import progress
from ..engine.source import root_path
from ..errors import ConfigError
from ..io.dtypes import dtype_name
from ..registry import MethodConfig
from ..tensor import spectral as S
from .parallel import _blas_one_thread, _gather, _world, default_threads, share  # noqa: F401 (re-exported)
from .plan import _Item, as_source, plan  # noqa: F401  (as_source re-exported)
from .result import InspectResult, Table, _jsonable  # noqa: F401  (re-exported)
from .rows import _depth, _diff_row, _f, _spectral_row
from .summary import diff_summary, spectral_summary


class InspectConfig(MethodConfig):
    """Which tensors to analyse and how (defaults are WeightWatcher 0.7.7's)."""

    min_evals: int = Field(8, ge=1, description="skip matrices with fewer eigenvalues (WeightWatcher's min_evals)")
    max_evals: int = Field(15000, ge=1, description="skip matrices with more eigenvalues (WeightWatcher's max_evals)")
    max_n: int = Field(50000, ge=1, description="skip matrices whose larger side is longer (WeightWatcher's max_N)")
    conv2d_norm: bool = Field(True, description="scale conv ESDs by 1/2 (kernels by 1/sqrt 2) as WeightWatcher's "
                                                "conv2d_norm does; changes log norms, not alpha")
    filters: bool = Field(True, description="conv filter quality (CNN Filter DB) for spatial kernels")
    sparsity_eps: float = Field(0.01, gt=0, lt=1, description="a filter is sparse if all |w| < eps * max|w|")
    include: str | None = Field(None, description="regex: analyse only tensors whose name matches")
    exclude: str | None = Field(None, description="regex: skip tensors whose name matches")
    threads: int | None = Field(None, ge=1, description="worker threads (default: one per available core)")

    @field_validator("include", "exclude")
    @classmethod
    def _regex(cls, v):
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return v


class DiffOptions(MethodConfig):
    k: int = Field(10, ge=1, description="top-k singular vectors of the fine-tuned matrix checked for intruders")
    eps: float = Field(0.5, gt=0, le=1, description="a top vector is an intruder if max |cos| with every base "
                                                    "singular vector is below eps")




def _work(it: _Item, src, base, cfg: InspectConfig, opts: DiffOptions, base_names: set | None, device=None):
    """Everything about one weight matrix: (row, diff row or None, ESD); Gram/eigen work on ``device``."""
    t = src.get(it.name)
    w = S.to_numpy(t)
    if not np.isfinite(w).all():
        bad = int(np.size(w) - np.isfinite(w).sum())
        row = {"name": it.name, "kind": it.kind, "shape": list(it.shape), "dtype": dtype_name(it.dtype), "N": it.n,
               "M": it.m, "rf": it.rf, "fit": "failed",
               "warnings": [f"{bad} NaN/Inf values: not analysed"]}
        drow = None if base is None else {"name": it.name, "kind": it.kind, "shape": list(it.shape),
                                          "status": "non-finite"}
        return row, drow, np.zeros(0)
    x = w.reshape(it.shape[0], -1)
    drow = None
    if base is not None and base_names is not None and it.name in base_names:
        g = S.gram_svd(x, device)
        lam = np.ascontiguousarray((g.s ** 2)[::-1])
        fro2 = g.fro2
        row, esd = _spectral_row(it, w, lam, fro2, cfg, device)
        binfo = base.info(it.name)
        if tuple(binfo.shape) != it.shape:
            drow = {"name": it.name, "kind": it.kind, "shape": list(it.shape), "status": "shape mismatch",
                    "base_shape": list(binfo.shape)}
        else:
            w0 = S.to_numpy(base.get(it.name))
            if not np.isfinite(w0).all():
                drow = {"name": it.name, "kind": it.kind, "shape": list(it.shape), "status": "non-finite in base"}
            else:
                drow = _diff_row(it, x, g, w0.reshape(x.shape), binfo.dtype, opts, device)
            _release(base, it.name)
    else:
        lam, fro2 = S.matrix_eigenvalues(x, device)
        row, esd = _spectral_row(it, w, lam, fro2, cfg, device)
        if base is not None:
            drow = {"name": it.name, "kind": it.kind, "shape": list(it.shape), "status": "only in model"}
    _release(src, it.name)
    return row, drow, esd


def _simple_diff(name: str, src, base) -> dict:
    """Change of a tensor that is not analysed as a matrix (norm weights, biases, small matrices)."""
    info = src.info(name)
    binfo = base.info(name)
    row = {"name": name, "kind": "other", "shape": list(info.shape), "depth": _depth(name)}
    if tuple(binfo.shape) != tuple(info.shape):
        row.update({"status": "shape mismatch", "base_shape": list(binfo.shape)})
        return row
    a = S.to_numpy(src.get(name)).astype(np.float64).reshape(-1)
    b = S.to_numpy(base.get(name)).astype(np.float64).reshape(-1)
    d = float(np.linalg.norm(a - b))
    bn = float(np.linalg.norm(b))
    row.update({"base_norm": _f(bn), "delta_norm": _f(d), "rel_change": _f(d / bn) if bn > 0 else None,
                "status": "unchanged" if d == 0 else "changed"})
    return row


def _release(src, name: str) -> None:
    rel = getattr(src, "release", None)
    if callable(rel):
        rel(name)


# ----------------------------------------------------------------------------- the pass

def run(source, cfg: InspectConfig, base=None, opts: DiffOptions | None = None, *, show_progress: bool | None = None,
        keep_spectra: bool = True, device=None, distributed: bool | None = None) -> InspectResult:
    """Analyse every weight matrix of ``source`` (and compare with ``base`` if given).

    ``device``: where Gram matrices and eigendecompositions run (float64; None = the CPU numpy path).
    ``distributed``: None splits the layers over the ranks of an initialised torch.distributed group
    (balanced by cost), True requires one, False never splits. Each rank analyses its share, the rows
    are all-gathered, and every rank returns the same result, equal to a one-process run.
    """
    t0 = time.perf_counter()
    opts = opts or DiffOptions()
    rank, world = _world(distributed)
    items, skipped, others = plan(source, cfg)
    by_name = {it.name: it for it in items}
    todo = [it for it in items if it.tied_to is None or it.tied_to not in by_name]
    base_names = set(base.names()) if base is not None else None
    threads = cfg.threads or default_threads()
    results: dict[str, tuple] = {}
    simple: dict[str, dict] = {}
    order = sorted(todo, key=lambda it: -it.cost)
    other_common = [n for n in others if base_names is not None and n in base_names
                    and base.info(n).dtype.is_floating_point]
    mine, other_mine = order, other_common
    if world > 1:
        owner = share([it.cost for it in order] + [float(math.prod(base.info(n).shape)) for n in other_common], world)
        mine = [it for it, r in zip(order, owner) if r == rank]
        other_mine = [n for n, r in zip(other_common, owner[len(order):]) if r == rank]
        if show_progress is None and rank != 0:
            show_progress = False  # one progress bar (rank 0's share), not one per process
    # One BLAS thread per worker, always: our threads already use the cores, and multi-threaded
    # OpenBLAS on a busy machine spin-waits (10x slower). threadpool_limits applies at once and
    # is undone when the with block exits.
    limiter = _blas_one_thread()
    if limiter is None and cfg.threads is None:
        threads = 1  # without threadpoolctl, several threads of multi-threaded BLAS would oversubscribe the cores
    error = None
    try:
        with limiter if limiter is not None else nullcontext():
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="weightlab-inspect") as ex:
                futs = {ex.submit(_work, it, source, base, cfg, opts, base_names, device): it.name for it in mine}
                futs.update({ex.submit(_simple_diff, n, source, base): "\0" + n for n in other_mine})
                desc = "inspect" if base is None else "inspect + diff"
                try:
                    for f in progress(as_completed(futs), desc, total=len(futs), enabled=show_progress):
                        key = futs[f]
                        if key.startswith("\0"):
                            simple[key[1:]] = f.result()
                        else:
                            results[key] = f.result()
                except BaseException:
                    for f in futs:
                        f.cancel()
                    raise
    except Exception as e:
        if world == 1:
            raise
        error = e
    if world > 1:
        parts = _gather({"error": f"{type(error).__name__}: {error}" if error is not None else None,
                         "results": {} if error is not None else results,
                         "simple": {} if error is not None else simple})
        if error is not None:
            raise error
        failed = [(r, p["error"]) for r, p in enumerate(parts) if p["error"]]
        if failed:
            from ..errors import WeightlabError

            raise WeightlabError(f"inspect failed on rank {failed[0][0]}: {failed[0][1]}")
        for p in parts:
            results.update(p["results"])
            simple.update(p["simple"])
    rows, drows, spectra = [], [], {}
    for it in items:
        if it.name in results:
            row, drow, esd = results[it.name]
        else:  # tied to an analysed tensor: same numbers
            row, drow, esd = results[it.tied_to]
            row = {**row, "name": it.name, "tied_to": it.tied_to}
            drow = None if drow is None else {**drow, "name": it.name, "tied_to": it.tied_to}
        rows.append(row)
        if drow is not None:
            drows.append(drow)
        if keep_spectra and len(esd):
            spectra[it.name] = esd
    drows += [simple[n] for n in other_common if n in simple]
    summary = spectral_summary(rows, skipped)
    path = root_path(source)
    summary["model"] = str(path) if path else type(source).__name__
    summary["threads"] = threads
    if device is not None:
        summary["device"] = str(device)
    if world > 1:
        summary["processes"] = world
    if base is not None:
        bpath = root_path(base)
        names = set(source.names())
        only_base = [n for n in base.names() if n not in names and base.info(n).dtype.is_floating_point]
        summary["diff"] = {"base": str(bpath) if bpath else type(base).__name__, **diff_summary(drows, opts, only_base)}
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return InspectResult(rows, drows, summary, spectra)


def resolve_inspect_device(spec, distributed: bool | None):
    """The compute device (None = numpy on the CPU). Under torchrun each rank takes the GPU of its LOCAL_RANK
    when the device is 'auto' or an unnumbered 'cuda'."""
    from ..engine.placement import float64_device, on_device

    if spec is None:
        return None
    dev = float64_device(spec)
    if not on_device(dev):
        return None
    if dev.type == "cuda" and distributed is not False and "LOCAL_RANK" in os.environ \
            and str(spec).strip().lower() in ("auto", "cuda"):
        import torch

        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    return dev


def analyze(model_or_path, base=None, *, k: int = 10, eps: float = 0.5, show_progress: bool | None = None,
            device=None, distributed: bool | None = None, **options) -> InspectResult:
    """Inspect a model's weights; with ``base``, also what changed relative to it.

    ``model_or_path`` and ``base``: a checkpoint file or folder, ``"zoo:smollm2"``, a tensor
    source (e.g. ``wl.open_checkpoint(path)``), an ``nn.Module`` (its state dict) or a state dict.
    ``options`` are InspectConfig fields (min_evals, max_evals, max_n, conv2d_norm, filters,
    sparsity_eps, include, exclude, threads). Returns an InspectResult: a list of per-layer
    rows with ``.diff``, ``.summary``, ``.spectra``, ``.to_pandas()``, ``.to_json()`` and
    ``.write_html(path)``.

    ``device``: where the float64 Gram matrices and eigendecompositions run: None or "cpu" (numpy,
    the reference), "auto", "cuda", "cuda:N" ("mps" has no float64: an error; "auto" then uses the
    CPU). ``distributed``: see ``run`` (None = split the layers over an initialised
    torch.distributed group).
    """
    from pydantic import ValidationError

    from ..configfile import describe_validation_error

    try:
        cfg = InspectConfig(**options)
        opts = DiffOptions(k=k, eps=eps)
    except ValidationError as e:
        raise ConfigError(f"invalid inspect options: {describe_validation_error(e)}") from None
    opened = []  # sources opened here from paths are closed here (their memory maps and file handles)
    try:
        src = as_source(model_or_path, "model")
        if src is not model_or_path and isinstance(model_or_path, (str, os.PathLike)):
            opened.append(src)
        b = as_source(base, "base") if base is not None else None
        if b is not None and isinstance(base, (str, os.PathLike)):
            opened.append(b)
        return run(src, cfg, b, opts, show_progress=show_progress, device=resolve_inspect_device(device, distributed),
                   distributed=distributed)
    finally:
        for s in opened:
            close = getattr(s, "close", None)
            if callable(close):
                close()
