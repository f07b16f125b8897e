"""Read mergekit YAML configs: the same merges as `mergekit-yaml`, run by weightlab's engine.

Supported: merge_method linear, task_arithmetic, ties, dare_linear, dare_ties; `models`
with per-model `parameters` (weight, density); `base_model`; global `parameters`
(normalize, lambda, rescale, int8_mask); `dtype` and `out_dtype`. Anything else is an error
that names the key: a silently ignored key would give different weights than mergekit.
"""
from __future__ import annotations

from ..errors import ConfigError
from .job import MergeJob

METHODS = {
    # mergekit name: (weightlab method, fixed params, default normalize)
    "linear": ("linear", {}, True),
    "task_arithmetic": ("task-arithmetic", {}, False),
    "ties": ("ties", {"trim": "topk", "scope": "tensor", "zero_sign": "positive"}, True),
    "dare_linear": ("dare", {"combine": "linear", "drop": "random"}, False),
    "dare_ties": ("dare", {"combine": "ties", "drop": "random", "zero_sign": "positive"}, False),
}
TOP_KEYS = {"merge_method", "models", "base_model", "parameters", "dtype", "out_dtype"}
GLOBAL_PARAMS = {"normalize", "lambda", "rescale", "int8_mask"}
MODEL_PARAMS = {"weight", "density"}


def is_mergekit(data: dict) -> bool:
    return isinstance(data, dict) and "merge_method" in data


def _scalar(value, where: str):
    if isinstance(value, (list, dict)):
        raise ConfigError(f"mergekit config: {where} is a list or filter ({value!r}); per-layer gradients and "
                          "name filters are not supported yet, use one number")
    return value


def _number(value, where: str, lo: float | None = None, hi: float | None = None) -> float:
    """A mergekit scalar as a float, with one clear line when it is not a number or out of range."""
    value = _scalar(value, where)
    if isinstance(value, bool):
        raise ConfigError(f"mergekit config: {where} must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"mergekit config: {where} must be a number, got {value!r}") from None
    if (lo is not None and not x > lo) or (hi is not None and x > hi) or x != x:
        raise ConfigError(f"mergekit config: {where} must be in ({lo}, {hi}], got {value!r}")
    return x


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"mergekit config: {where} must be a mapping of names to values, got {value!r}")
    return value


def from_mergekit(data: dict) -> MergeJob:
    problems = []
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        problems.append(f"unsupported key(s) {', '.join(map(repr, unknown))} (supported: {', '.join(sorted(TOP_KEYS))})")
    method = data.get("merge_method")
    if method not in METHODS:
        problems.append(f"merge_method {method!r} is not supported (supported: {', '.join(METHODS)})")
    if not isinstance(data.get("models"), list) or not data["models"]:
        problems.append("'models' must be a non-empty list")
    if problems:
        raise ConfigError("mergekit config: " + "; ".join(problems))
    wl_method, fixed, default_normalize = METHODS[method]
    base = data.get("base_model")
    gparams = _mapping(data.get("parameters"), "parameters")
    bad = sorted(set(gparams) - GLOBAL_PARAMS)
    if bad:
        raise ConfigError(f"mergekit config: unsupported parameter(s) {bad} (supported: {sorted(GLOBAL_PARAMS)})")
    params = dict(fixed)
    if method != "linear":
        params["lambda"] = _number(gparams.get("lambda", 1.0), "parameters.lambda")
    params["normalize"] = bool(_scalar(gparams.get("normalize", default_normalize), "parameters.normalize"))
    if method.startswith("dare"):
        params["rescale"] = "l1" if _scalar(gparams.get("rescale", True), "parameters.rescale") else "none"
    if method in ("ties", "dare_linear", "dare_ties"):
        params["density"] = 1.0  # mergekit's default density (no trimming) unless a model sets one
    models = []
    for i, entry in enumerate(data["models"]):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"mergekit config: models[{i}] needs a 'model' key")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise ConfigError(f"mergekit config: models[{i}] has unsupported key(s) {extra}")
        path = str(entry["model"])
        if "+" in path and not _exists(path):
            raise ConfigError(f"mergekit config: models[{i}] '{path}' looks like model+LoRA, which is not supported "
                              "yet; merge the adapter into the model first")
        mp = _mapping(entry.get("parameters"), f"models[{i}].parameters")
        bad = sorted(set(mp) - MODEL_PARAMS)
        if bad:
            raise ConfigError(f"mergekit config: models[{i}].parameters has unsupported key(s) {bad}")
        if method != "linear" and base is not None and path == str(base):
            continue  # mergekit skips the base among the task-vector models
        ref = {"path": path, "weight": _number(mp.get("weight", 1.0), f"models[{i}].weight")}
        if "density" in mp:
            ref["density"] = _number(mp["density"], f"models[{i}].density", 0, 1)
        models.append(ref)
    dtype = data.get("out_dtype") or data.get("dtype")
    from ..configfile import build

    return build(MergeJob, dict(method=wl_method, models=models, base=str(base) if base is not None else None,
                                params=params, dtype=dtype, source_format="mergekit"), "mergekit config")


def _exists(path: str) -> bool:
    from pathlib import Path

    return Path(path).exists()
