"""Read mergekit YAML configs: the same merges as `mergekit-yaml`, run by weightlab's engine.

Supported: merge_method linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs,
breadcrumbs_ties, della, della_linear, slerp, nuslerp, model_stock, passthrough; `models` or `slices`
(with `layer_range`, per-slice `base_model` and `parameters`); `base_model`; parameters at every level
(global, slice, model/source) as numbers, gradients over the layers or `filter`/`value` lists; `dtype` and
`out_dtype`; `tokenizer_source` (base, union or a model); `model+lora` inputs (a PEFT LoRA folded into its model as it is read). Anything else is an error that names the key: a silently ignored key would give different
weights than mergekit.
"""
from __future__ import annotations

from ..errors import ConfigError
from ..io.lora_fold import split_model_lora
from . import schedule
from .job import MergeJob

# mergekit name: (weightlab method, fixed params, mergekit's default normalize, default rescale or None)
METHODS = {
    "linear": ("linear", {}, True, None),
    "task_arithmetic": ("task-arithmetic", {}, False, None),
    "ties": ("ties", {"trim": "topk", "scope": "tensor", "zero_sign": "positive"}, True, None),
    "dare_linear": ("dare", {"combine": "linear", "drop": "random"}, False, True),
    "dare_ties": ("dare", {"combine": "ties", "drop": "random", "zero_sign": "positive"}, False, True),
    "breadcrumbs": ("breadcrumbs", {"combine": "linear"}, False, False),
    "breadcrumbs_ties": ("breadcrumbs", {"combine": "ties", "zero_sign": "positive"}, False, False),
    "della": ("della", {"combine": "ties", "zero_sign": "positive"}, True, True),
    "della_linear": ("della", {"combine": "linear"}, False, True),
    "slerp": ("slerp", {}, None, None),
    "nuslerp": ("nuslerp", {}, None, None),
    "model_stock": ("model-stock", {}, None, None),
    "passthrough": ("passthrough", {}, None, None),
}
TASK_VECTOR = {"task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
               "della_linear"}
NEEDS_BASE = TASK_VECTOR | {"slerp", "model_stock"}
TOP_KEYS = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source"}
# mergekit's method parameters (global/slice level) -> weightlab's names
GLOBAL_PARAMS = {"normalize": "normalize", "lambda": "lambda", "rescale": "rescale", "int8_mask": None, "t": "t",
                 "nuslerp_row_wise": "row_wise", "nuslerp_flatten": "flatten", "filter_wise": "filter_wise"}
# per-model (tensor) parameters; weight/density are ModelRef fields, the rest go to ModelRef.params
MODEL_PARAMS = {"weight", "density", "gamma", "epsilon", "scale"}


def is_mergekit(data: dict) -> bool:
    return isinstance(data, dict) and "merge_method" in data


def _number(value, where: str, lo: float | None = None, hi: float | None = None):
    """A mergekit setting of numbers (a number, a gradient or filter entries), checked with one clear line."""
    try:
        schedule.check(value, where)
    except ConfigError as e:
        raise ConfigError(f"mergekit config: {e}") from None
    for x in schedule.leaves(value):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            try:
                x = float(x)
            except (TypeError, ValueError):
                raise ConfigError(f"mergekit config: {where} must be a number, got {x!r}") from None
        if (lo is not None and not x > lo) or (hi is not None and x > hi) or x != x:
            raise ConfigError(f"mergekit config: {where} must be in ({lo}, {hi}], got {x!r}")
    return _floats(value)


def _floats(value):
    if isinstance(value, dict):
        return {**value, "value": _floats(value["value"])}
    if isinstance(value, (list, tuple)):
        return [_floats(v) for v in value]
    return float(value)


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"mergekit config: {where} must be a mapping of names to values, got {value!r}")
    return value


def _method_params(raw: dict, where: str, method: str) -> dict:
    """Global or slice `parameters` in weightlab's names (per-model keys stay, as defaults for every model)."""
    bad = sorted(set(raw) - set(GLOBAL_PARAMS) - MODEL_PARAMS)
    if bad:
        raise ConfigError(f"mergekit config: {where} has unsupported parameter(s) {bad} (supported: "
                          f"{sorted(set(GLOBAL_PARAMS) | MODEL_PARAMS)})")
    out = {}
    for k, v in raw.items():
        if k in MODEL_PARAMS:
            out[k] = _number(v, f"{where}.{k}", *((0, 1) if k == "density" else (None, None)))
        elif k == "int8_mask":
            continue  # a memory option of mergekit's; no effect on the result
        elif k == "rescale":
            if method.startswith(("dare", "della")):
                out["rescale"] = _choice(v, f"{where}.rescale", lambda b: "l1" if b else "none")
            else:
                out["rescale"] = _choice(v, f"{where}.rescale", bool)
        elif k in ("normalize", "nuslerp_row_wise", "nuslerp_flatten", "filter_wise"):
            out[GLOBAL_PARAMS[k]] = _choice(v, f"{where}.{k}", bool)
        else:
            out[GLOBAL_PARAMS[k]] = _number(v, f"{where}.{k}")
    return out


def _choice(value, where: str, conv):
    if isinstance(value, (list, dict)):
        try:
            schedule.check(value, where)
        except ConfigError as e:
            raise ConfigError(f"mergekit config: {e}") from None
        if isinstance(value, list) and all(isinstance(e, dict) for e in value):
            return [{**e, "value": conv(e["value"])} for e in value]
        return [conv(x) for x in value]
    return conv(value)


def _model_ref(entry, where: str, *, in_slice: bool) -> dict:
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict) or "model" not in entry:
        raise ConfigError(f"mergekit config: {where} needs a 'model' key")
    allowed = {"model", "parameters"} | ({"layer_range"} if in_slice else set())
    extra = sorted(set(entry) - allowed)
    if extra:
        raise ConfigError(f"mergekit config: {where} has unsupported key(s) {extra}")
    path, lora = split_model_lora(str(entry["model"]))
    mp = _mapping(entry.get("parameters"), f"{where}.parameters")
    bad = sorted(set(mp) - MODEL_PARAMS)
    if bad:
        raise ConfigError(f"mergekit config: {where}.parameters has unsupported key(s) {bad} "
                          f"(supported: {sorted(MODEL_PARAMS)})")
    ref: dict = {"path": path, "lora": lora, "params": {}}
    for k, v in mp.items():
        val = _number(v, f"{where}.{k}", *((0, 1) if k == "density" else (None, None)))
        if k in ("weight", "density"):
            ref[k] = val
        else:
            ref["params"][k] = val
    if in_slice:
        lr = entry.get("layer_range")
        if not (isinstance(lr, (list, tuple)) and len(lr) == 2 and all(isinstance(x, int) for x in lr)):
            raise ConfigError(f"mergekit config: {where}.layer_range must be [start, end], got {lr!r}")
        ref["layer_range"] = tuple(lr)
    return ref


def from_mergekit(data: dict) -> MergeJob:
    problems = []
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        problems.append(f"unsupported key(s) {', '.join(map(repr, unknown))} (supported: {', '.join(sorted(TOP_KEYS))})")
    method = data.get("merge_method")
    if method not in METHODS:
        problems.append(f"merge_method {method!r} is not supported (supported: {', '.join(METHODS)})")
    has_models, has_slices = data.get("models") is not None, data.get("slices") is not None
    if has_models == has_slices:
        problems.append("give exactly one of 'models' and 'slices'")
    elif has_models and (not isinstance(data["models"], list) or not data["models"]):
        problems.append("'models' must be a non-empty list")
    elif has_slices and (not isinstance(data["slices"], list) or not data["slices"]):
        problems.append("'slices' must be a non-empty list")
    if problems:
        raise ConfigError("mergekit config: " + "; ".join(problems))
    wl_method, fixed, default_normalize, default_rescale = METHODS[method]
    base = str(data["base_model"]) if data.get("base_model") is not None else None
    params = dict(fixed)
    if default_normalize is not None:
        params["normalize"] = default_normalize
    if default_rescale is not None:
        params["rescale"] = ("l1" if default_rescale else "none") if method.startswith(("dare", "della")) \
            else default_rescale
    if method in TASK_VECTOR - {"task_arithmetic"}:
        params["density"] = 1.0  # mergekit's default density (nothing dropped) unless a model sets one
    params.update(_method_params(_mapping(data.get("parameters"), "parameters"), "parameters", method))
    if method == "slerp" and "t" not in params and not has_slices:
        raise ConfigError("mergekit config: slerp needs parameters.t (0: the base model, 1: the other)")
    if method in NEEDS_BASE and base is None and not (has_slices and any(
            isinstance(s, dict) and s.get("base_model") for s in data["slices"])):
        raise ConfigError(f"mergekit config: merge_method {method} needs base_model")
    job: dict = dict(method=wl_method, params=params, dtype=data.get("out_dtype") or data.get("dtype"),
                     source_format="mergekit")
    if data.get("tokenizer_source") is not None:
        job["tokenizer_source"] = str(data["tokenizer_source"])
    if has_models:
        models = [_model_ref(e, f"models[{i}]", in_slice=False) for i, e in enumerate(data["models"])]
        if method in ("linear", "passthrough"):
            # mergekit's linear ignores base_model (but its tokenizer merge starts from it); passthrough has one model
            job.update(models=models, base=base if job.get("tokenizer_source") else None)
        else:
            # the base is the common point (task vectors, model_stock) or the t=0 end (slerp), not a model
            job.update(models=[m for m in models if _key(m) != base], base=base)
    else:
        slices = []
        for k, sl in enumerate(data["slices"]):
            if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
                raise ConfigError(f"mergekit config: slices[{k}] needs a non-empty 'sources' list")
            extra = sorted(set(sl) - {"sources", "base_model", "parameters"})
            if extra:
                raise ConfigError(f"mergekit config: slices[{k}] has unsupported key(s) {extra}")
            sp = _method_params(_mapping(sl.get("parameters"), f"slices[{k}].parameters"),
                                f"slices[{k}].parameters", method)
            sbase = str(sl["base_model"]) if sl.get("base_model") is not None else None
            srcs = [_model_ref(e, f"slices[{k}].sources[{i}]", in_slice=True) for i, e in enumerate(sl["sources"])]
            slices.append({"sources": srcs, "base": sbase or (base if method not in ("linear", "passthrough")
                                                              else None), "params": sp})
        job.update(slices=slices)
    from ..configfile import build

    return build(MergeJob, job, "mergekit config")


def _key(ref: dict) -> str:
    return f"{ref['path']}+{ref['lora']}" if ref.get("lora") else ref["path"]
