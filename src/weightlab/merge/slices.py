"""Slices: build the output layer by layer from layer ranges of the inputs (mergekit's frankenmerges).

Each slice takes the same number of layers from each of its sources; output layers are numbered on
through the slices, so the output may have more or fewer layers than any input (config.json's layer
count and per-layer lists are rewritten to match). Tensors outside the layers (embeddings before,
final norm and head after) come from the first slice's sources (embeddings) or the last slice's (the rest).
Within a slice a layer's position t runs 0..1 for per-layer gradients of the parameters.
"""
from __future__ import annotations

import re

from .validate import MergeValidationError, TensorPlan, _label

LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|layer|blocks|block))\.(?P<i>\d+)\.(?P<rest>.+)$")
PRE = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings")


def _layers(src):
    """prefix, {layer index: [suffixes]} and the tensors outside the layers."""
    prefix, layers, other = None, {}, []
    for n in src.names():
        m = LAYER.match(n)
        if m is None:
            other.append(n)
            continue
        prefix = prefix or m["prefix"]
        if m["prefix"] == prefix:
            layers.setdefault(int(m["i"]), []).append(m["rest"])
        else:
            other.append(n)
    return prefix, layers, other


def plan_slices(job, srcs: list, base_path: str | None) -> tuple[list[TensorPlan], list[int]]:
    """The tensor plan of a sliced job and, per output layer, the source layer it was taken from."""
    index = {m.key: i for i, m in enumerate(job.models)}
    shapes = [_layers(s) for s in srcs]
    has = [set(s.names()) for s in srcs]
    problems: list[str] = []
    plan: list[TensorPlan] = []
    layer_from: list[int] = []

    def entry(name, own_names, sl, t):
        base = sl.base or base_path
        refs, models, names, b = [], [], [], None
        for ref, own in zip(sl.sources, own_names):
            i = index[ref.key]
            if base is not None and ref.key == base and b is None:
                b = (i, own)
                continue
            refs.append(ref)
            models.append(i)
            names.append(own)
        if base is not None and b is None:
            problems.append(f"{name}: the base {base} is not one of the slice's sources (list it with its "
                            "layer_range)")
        every = list(zip(models, names)) + ([b] if b else [])
        missing = [(i, own) for i, own in every if own not in has[i]]
        for i, own in missing:
            problems.append(f"{_label(srcs[i], i)} has no tensor {own}")
        ref_i, ref_name = b if b else every[0]
        floating = ref_name in has[ref_i] and srcs[ref_i].info(ref_name).dtype.is_floating_point
        plan.append(TensorPlan(name, names, bool(floating), t, models, refs, b, sl.params))
        if not missing:
            shp = {tuple(srcs[i].info(own).shape) for i, own in every}
            if len(shp) > 1:
                problems.append(f"{name}: shapes differ between the sources: {sorted(shp)}")

    first, last = job.slices[0], job.slices[-1]
    prefix0, _, other0 = shapes[index[first.sources[0].key]]
    if prefix0 is None:
        raise MergeValidationError(f"{first.sources[0].path}: found no numbered layers (e.g. model.layers.0.*) "
                                   "to slice")
    pre = [n for n in other0 if PRE.search(n)]
    post = [n for n in other0 if not PRE.search(n)]
    for n in pre:
        entry(n, [n] * len(first.sources), first, 0.0)
    out_layer = 0
    for k, sl in enumerate(job.slices):
        for ref in sl.sources:
            prefix, layers, _ = shapes[index[ref.key]]
            a, b = ref.layer_range
            if prefix != prefix0 or not layers or b > max(layers) + 1:
                have = f"layers 0-{max(layers)}" if layers else "no layers"
                problems.append(f"slices[{k}]: {ref.path} layer_range {list(ref.layer_range)} is outside its "
                                f"{have}" + (f" under {prefix!r}" if prefix and prefix != prefix0 else ""))
        if problems:
            continue
        n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for off in range(n):
            t = off / (n - 1) if n > 1 else 1.0
            src0 = sl.sources[0]
            suffixes = shapes[index[src0.key]][1][src0.layer_range[0] + off]
            for rest in suffixes:
                own = [f"{prefix0}.{r.layer_range[0] + off}.{rest}" for r in sl.sources]
                entry(f"{prefix0}.{out_layer}.{rest}", own, sl, t)
            layer_from.append(src0.layer_range[0] + off)
            out_layer += 1
    for n in post:
        entry(n, [n] * len(last.sources), last, 0.0)
    problems = list(dict.fromkeys(problems))
    if problems:
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise MergeValidationError("the slices cannot be merged:\n  - " + "\n  - ".join(problems[:12]) + more)
    return plan, layer_from


def relayer_config(layer_from: list[int]):
    """A config.json edit: the new layer count, and per-layer lists re-indexed to the layers' sources."""
    def edit(cfg: dict) -> dict:
        old = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers")
        out = dict(cfg)
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in cfg:
                out[key] = len(layer_from)
        if old:
            for k, v in cfg.items():
                if isinstance(v, list) and len(v) == old and k not in ("architectures",):
                    out[k] = [v[i] for i in layer_from]
        return out
    return edit
