"""Check every input against the base before any tensor is merged; report all problems at once."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from .schedule import layer_positions


class MergeValidationError(ConfigError):
    pass


@dataclass
class TensorPlan:
    name: str  # the base's (canonical) name
    sources: list[str]  # each model's own name for it
    merged: bool  # False: copied from the base (integer and bool buffers)
    t: float = 0.0  # the layer's position 0..1 (for per-layer gradients of the parameters)
    # slices (frankenmerges) only: which opened models feed this tensor, their ModelRefs, the base as
    # (model index, its own name) when it is one of the sources, and the slice's parameters
    models: list[int] | None = None
    refs: list = field(default_factory=list)
    base: tuple[int, str] | None = None
    slice_params: dict | None = None


def _label(src, i: int) -> str:
    p = getattr(src, "path", None)
    return str(p) if p is not None else f"model #{i + 1}"


def plan_tensors(models: list, base, name_maps: list[dict[str, str]], vocab_rows=None) -> list[TensorPlan]:
    """Align names, shapes, dtypes, architectures and vocab sizes of all inputs to the reference.

    The reference is the base model if given, else the first model. ``vocab_rows(name, shape)`` marks
    the embedding/LM-head tensors whose row counts may differ (a tokenizer_source re-indexes them).
    """
    ref = base if base is not None else models[0]
    ref_label = _label(ref, 0) if base is None else f"base {_label(base, 0)}"
    problems: list[str] = []
    ref_names = ref.names()
    ref_set = set(ref_names)
    per_model: list[dict[str, str]] = []  # canonical -> own name
    for i, m in enumerate(models):
        if m is ref:
            per_model.append({n: n for n in ref_names})
            continue
        nm = name_maps[i] if i < len(name_maps) else {}
        canon = {nm.get(n, n): n for n in m.names()}
        missing = sorted(ref_set - set(canon))
        extra = sorted(set(canon) - ref_set)
        if missing:
            problems.append(f"{_label(m, i)} lacks {len(missing)} tensor(s) of {ref_label}: {_few(missing)}")
        if extra:
            problems.append(f"{_label(m, i)} has {len(extra)} tensor(s) not in {ref_label}: {_few(extra)} "
                            "(map names with name_map)")
        per_model.append(canon)
    shape_bad, dtype_bad = [], []
    for n in ref_names:
        ri = ref.info(n)
        for i, m in enumerate(models):
            own = per_model[i].get(n)
            if own is None or m is ref:
                continue
            mi = m.info(own)
            if vocab_rows is not None and vocab_rows(n, ri.shape) and tuple(mi.shape[1:]) == tuple(ri.shape[1:]):
                pass  # rows follow each model's vocabulary; columns must agree
            elif mi.shape != ri.shape:
                shape_bad.append(f"{n}: {_label(m, i)} {list(mi.shape)} vs {list(ri.shape)}")
            if mi.dtype.is_floating_point != ri.dtype.is_floating_point:
                dtype_bad.append(f"{n}: {_label(m, i)} {mi.dtype} vs {ri.dtype}")
    if shape_bad:
        problems.append(f"{len(shape_bad)} shape mismatch(es): {_few(shape_bad)}")
    if dtype_bad:
        problems.append(f"{len(dtype_bad)} dtype mismatch(es) (floating vs integer): {_few(dtype_bad)}")
    problems += _config_problems([m for m in models if m is not ref], ref, ref_label,
                                 skip=("vocab_size",) if vocab_rows is not None else ())
    if problems:
        raise MergeValidationError("inputs cannot be merged:\n  - " + "\n  - ".join(problems))
    ts = layer_positions(ref_names)
    return [TensorPlan(n, [per_model[i][n] for i in range(len(models))], ref.info(n).dtype.is_floating_point, ts[n])
            for n in ref_names]


CONFIG_KEYS = ("architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size")


def _config_problems(models: list, ref, ref_label: str, skip=()) -> list[str]:
    rc = getattr(ref, "config", None) or {}
    out = []
    for i, m in enumerate(models):
        mc = getattr(m, "config", None) or {}
        for k in (k for k in CONFIG_KEYS if k not in skip):
            if k in rc and k in mc and rc[k] != mc[k]:
                what = "vocabulary size" if k == "vocab_size" else k
                out.append(f"{_label(m, i)} has {what} {mc[k]!r}, {ref_label} has {rc[k]!r}")
    return out


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" ... and {len(items) - n} more" if len(items) > n else "")
