"""attach / set_active / delete / fold / unfold / detach / regularizers / save / load for every adapter method.

A model may hold several named adapters (``attach(..., name=)``, as PEFT's ``add_adapter``); the active
ones (``set_active``) make the forward and are the trainable tensors; ``fold``, ``save`` and the PEFT
export take a ``name``. The one-adapter API is unchanged: everything defaults to "default" / the active one.

Exactness: ``fold`` computes W' = W + dW in float32 and rounds once to the layer's dtype. In
float32 the merged layer equals the adapter forward to float32 rounding (tests: atol 1e-5
relative to ||W||). In bf16 the merged weight is W' rounded to bf16, so each weight carries up
to 2^-9 relative error (one bf16 ulp) that the unmerged adapter forward (which adds the update
in the activation's dtype) does not have in the same place: expect merged-vs-adapter output
differences of the order of bf16 rounding (about 0.4% relative), not bit equality, and
merge-then-unmerge in bf16 restores W only to that rounding. Keep float32 weights when bit-level
round trips matter.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import get_method
from .layer import DEFAULT, AdapterLayer, check_adapter_name, layer_kind, set_weight_2d
from .hooks import (backward_regularizers, make_optimizer, regularizer_values, regularizers,  # noqa: F401
                    step_hooks)
from .named import (_check_patterns, _infos, _one, _resolve, _sync, active_adapters, adapter_info,  # noqa: F401
                    adapter_layers, adapter_names, layer_config, pattern_key, set_active)

FORMAT = "weightlab-adapter"
ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
SHARED = "_shared."  # tensors shared by every layer of the adapter, saved once under this prefix


def _output_embedding_names(model: nn.Module) -> set[str]:
    names = {"lm_head", "output", "classifier", "score"}
    try:
        emb = model.get_output_embeddings()
        for n, m in model.named_modules():
            if m is emb:
                names.add(n)
    except Exception:
        pass
    return names


def select_targets(model: nn.Module, targets, kinds: Iterable[str] = ("linear", "conv1d", "conv2d"),
                   include_adapted: bool = False) -> list[str]:
    """Module names selected by name suffixes (list), a regex (str), or "all-linear".

    ``include_adapted``: layers that already hold adapters count too (by their own name), as when a second
    named adapter is attached; otherwise only plain layers are candidates."""
    kinds = tuple(kinds)
    wrapped = adapter_layers(model)
    inside = tuple(f"{n}." for n in wrapped)
    cands = [(n, m) for n, m in model.named_modules() if n and layer_kind(m) is not None
             and not (inside and n.startswith(inside)) and ".base_layer" not in f".{n}"
             and ".adapter." not in f".{n}."]
    if include_adapted:
        cands += [(n, m.base_layer) for n, m in wrapped.items()]
    if targets is None or targets == "all-linear":
        skip = _output_embedding_names(model)
        out = [n for n, m in cands if layer_kind(m) in ("linear", "conv1d") and n.split(".")[-1] not in skip
               and n not in skip]
    elif isinstance(targets, str):
        try:
            rx = re.compile(targets)
        except re.error as e:
            raise ConfigError(f"targets regex {targets!r} is invalid: {e}") from None
        out = [n for n, _ in cands if rx.fullmatch(n)]  # like PEFT: the regex matches the whole name
    else:
        suff = list(targets)
        out = [n for n, _ in cands if any(n == s or n.endswith("." + s) for s in suff)]
    if not out:
        raise ConfigError(f"targets {targets!r} match no Linear/Conv1D/Conv2d layer of this model")
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(set(out), key=order.__getitem__)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def attach(model: nn.Module, method: str, targets="all-linear", *, name: str = DEFAULT,
           rank_pattern: dict | None = None, alpha_pattern: dict | None = None, _init: bool = True,
           _extend: bool = False, **config) -> nn.Module:
    """Add adapter ``name`` of ``method`` (registered in the "adapt" family) on the target layers; in place.

    ``targets``: name suffixes (``["q_proj", "v_proj"]``), a regex over full module names, or
    "all-linear" (every Linear/Conv1D except the output embedding). ``config`` are the method's
    parameters (paper defaults otherwise); ``rank_pattern`` / ``alpha_pattern`` ({key: r} / {key: alpha},
    keys matched as PEFT: a regex over the whole name or a dotted suffix) override r / alpha per layer.
    A second adapter under another name is added beside the first (the same name is an error); as in
    PEFT, the first adapter becomes active and later ones stay inactive (frozen) until ``set_active``.
    Afterwards only the active adapters' tensors require grad.
    """
    check_adapter_name(name)
    spec = get_method("adapt", method)
    if spec.kind != "adapter":
        raise ConfigError(f"'{spec.name}' is an adapt {spec.kind}, not an adapter method that attaches to layers")
    cfg = spec.make_config(config)
    infos = _infos(model)
    if name in infos and not _extend:
        raise ConfigError(f"the model already has an adapter named '{name}' ({infos[name]['method']}); attach "
                          f"under another name= or delete('{name}') first")
    if name in infos and infos[name]["method"] != spec.name:
        raise ConfigError(f"adapter '{name}' is {infos[name]['method']}, not {spec.name}")
    names = select_targets(model, targets, include_adapted=True)
    _check_patterns(spec, cfg, names, rank_pattern, alpha_pattern)
    meths = {n: spec.fn(layer_config(cfg, n, rank_pattern, alpha_pattern)) for n in names}
    for n, meth in meths.items():  # every layer checked before any is changed
        mod = model.get_submodule(n)
        if isinstance(mod, AdapterLayer):
            mod.check_add(name, meth)
        elif layer_kind(mod) not in meth.layer_kinds:
            raise ConfigError(f"adapter '{spec.name}' does not support layer '{n}' ({type(mod).__name__}); "
                              f"choose targets among {', '.join(meth.layer_kinds)} layers")
    for p in model.parameters():
        p.requires_grad_(False)
    prepare = getattr(spec.fn, "prepare", None)
    shared = prepare(model, names, cfg) if prepare is not None else None
    for n, meth in meths.items():
        mod = model.get_submodule(n)
        meth.shared = shared
        if isinstance(mod, AdapterLayer):
            mod.add(name, meth, init=_init)
            continue
        lay = AdapterLayer(mod, meth, n, init=_init, adapter_name=name)
        _set_module(model, n, lay)
    if name in infos:  # one adapter attached in groups (PEFT imports): the group's values as exact-name patterns
        info = infos[name]
        for field, key in (("r", "rank_pattern"), ("alpha", "alpha_pattern")):
            if field in config and config[field] != info["config"].get(field):
                info[key] = {**info.get(key, {}), **{re.escape(n): config[field] for n in names}}
    else:
        infos[name] = {"method": spec.name, "config": cfg.model_dump(mode="json"),
                       "rank_pattern": dict(rank_pattern or {}), "alpha_pattern": dict(alpha_pattern or {})}
    if not active_adapters(model):
        model.__dict__["_weightlab_active"] = [name]
    _sync(model)
    return model


def delete(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` (not folded) from the model; a layer left without adapters is the plain layer again."""
    adapter_info(model, name)
    layers = adapter_layers(model, name)
    folded = [n for n, lay in layers.items() if name in lay.merged_names]
    if folded:
        raise ConfigError(f"adapter '{name}' is folded into {folded[0]} (fold with unload=False): unfold first")
    for n, lay in layers.items():
        if len(lay.methods) == 1:
            if lay.method.changes_base:
                set_weight_2d(lay.base_layer, lay.method.original_weight(lay))
            _set_module(model, n, lay.base_layer)
        else:
            lay.remove(name)
    del _infos(model)[name]
    model.__dict__["_weightlab_active"] = [n for n in active_adapters(model) if n != name]
    _sync(model)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))


def fold(model: nn.Module, unload: bool = True, name: str | list[str] | None = None) -> nn.Module:
    """Fold adapters into their layers (float32 math, one rounding to the weight's dtype).

    ``name``: the adapter(s) to fold, default the active ones; several are added over the same base
    weight (the forward's rule). ``unload=True`` (default) removes the folded adapters: a layer with no
    adapter left is the plain base layer again (no adapter code, no added latency); adapters not folded
    stay attached (PEFT's merge_and_unload drops them). ``unload=False`` keeps the folded adapters,
    marked merged, so ``unfold`` can undo it.
    """
    names = _resolve(model, name)
    for n, lay in adapter_layers(model).items():
        todo = [a for a in names if a in lay.methods and a not in lay.merged_names]
        if unload and any(a not in names for a in lay.merged_names):
            raise ConfigError(f"layer '{n}' holds adapters folded earlier with unload=False "
                              f"({lay.merged_names}): unfold them or fold them too")
        if todo:
            Wm = lay.merged_weight(todo)
            bias = None
            for a in todo:
                with lay.using(a):
                    b = lay.method.merged_bias(lay)
                if b is not None:
                    bias = b if bias is None else bias + (b - lay.base_layer.bias.detach().float())
            keep = len(todo) > 1 or not all(lay.methods[a].invertible for a in todo)
            if not unload:  # undo by restoring a copy where the fold cannot be inverted from W' alone
                lay._merge_stack.append((todo, lay.weight_2d().detach().clone() if keep else None,
                                         lay.base_layer.bias.detach().clone() if keep and bias is not None else None))
            set_weight_2d(lay.base_layer, Wm)
            if bias is not None:
                with torch.no_grad():
                    lay.base_layer.bias.copy_(bias.to(lay.base_layer.bias.dtype))
            lay.merged_names += todo
        if unload:
            gone = [a for a in lay.methods if a in names]
            if len(gone) == len(lay.methods):
                _set_module(model, n, lay.base_layer)
            else:
                for a in gone:
                    lay.remove(a)
                lay._merge_stack = []
    if unload:
        for a in names:
            _infos(model).pop(a, None)
        model.__dict__["_weightlab_active"] = [a for a in active_adapters(model) if a not in names]
        _sync(model)
    return model


def _restore(m: AdapterLayer) -> None:
    """The weights (and a bias the fold changed) of a folded layer as they were before its folds."""
    with torch.no_grad():
        while m._merge_stack:
            names, W, b = m._merge_stack.pop()
            if W is None:
                with m.using(names[0]):
                    W = m.method.unmerge(m, m.weight_2d().detach().float())
            set_weight_2d(m.base_layer, W)
            if b is not None:
                m.base_layer.bias.copy_(b)
    m.merged_names = []


def unfold(model: nn.Module) -> nn.Module:
    """Undo ``fold(model, unload=False)`` (exact in float64 math for additive deltas; Bat inverts (I+T))."""
    for m in adapter_layers(model).values():
        if m.merged:
            _restore(m)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging; the layers get their original weights back."""
    for n, m in adapter_layers(model).items():
        if m.merged:
            _restore(m)
        for a, meth in m.methods.items():
            if meth.changes_base:
                with m.using(a):
                    set_weight_2d(m.base_layer, meth.original_weight(m))
        _set_module(model, n, m.base_layer)
    _infos(model).clear()
    _sync(model)
    return model


# -- weightlab adapter folders -------------------------------------------------------------
def adapter_state(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """One adapter's tensors as ``<layer>.<tensor>`` (default: the only / the active one)."""
    name = _one(model, name) if adapter_names(model) else None
    sd = {}
    for n, m in adapter_layers(model, name).items():
        for k, t in m.adapter_module(name or m.current).state_dict().items():
            sd[f"{n}.{k}"] = t.detach().contiguous()
    return sd


def save(model: nn.Module, out_dir, *, force: bool = False, base_model: str | None = None,
         name: str | None = None) -> Path:
    """Write one adapter (``name``; default the only / the active one) as a weightlab adapter folder
    (adapter.safetensors + adapter_config.json), atomically."""
    from safetensors.torch import save_file

    from ..io.atomic import AtomicFolder

    if not adapter_names(model) or not adapter_layers(model):
        raise ConfigError("the model has no adapter attached")
    name = _one(model, name)
    info = adapter_info(model, name)
    layers = adapter_layers(model, name)
    conf = {"format": FORMAT, "version": 1, "method": info["method"], "config": info["config"], "name": name,
            "rank_pattern": info.get("rank_pattern") or {}, "alpha_pattern": info.get("alpha_pattern") or {},
            "targets": sorted(layers), "base_model": base_model,
            "shapes": {n: [m.out_features, m.in_features] for n, m in layers.items()},
            "kinds": {n: m.kind for n, m in layers.items()},
            "conv_shapes": {n: list(m.base_layer.weight.shape) for n, m in layers.items() if m.kind == "conv2d"}}
    with AtomicFolder(out_dir, force=force) as tmp:
        first = next(iter(layers.values()))
        shared = first.methods[name].shared_state()  # once, not per layer (VeRA's projections)
        sd = {**adapter_state(model, name),
              **{f"{SHARED}{k}": v.detach().cpu().contiguous() for k, v in shared.items()}}
        save_file(sd, str(tmp / ADAPTER_FILE), metadata={"format": "pt", "weightlab.method": info["method"]})
        (tmp / CONFIG_FILE).write_text(json.dumps(conf, indent=1))
    return Path(out_dir)


def read_folder(path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    p = Path(path)
    cf = p / CONFIG_FILE
    if not cf.is_file() or not (p / ADAPTER_FILE).is_file():
        raise ConfigError(f"'{path}' is not a weightlab adapter folder (needs {ADAPTER_FILE} and {CONFIG_FILE})")
    conf = json.loads(cf.read_text())
    if conf.get("format") != FORMAT:
        raise ConfigError(f"'{path}' holds a {conf.get('peft_type', 'foreign')} adapter config, not a weightlab one"
                          " (PEFT adapters are read with import_peft)")
    return conf, load_file(str(p / ADAPTER_FILE))


def load(model: nn.Module, path, name: str | None = None) -> nn.Module:
    """Attach a saved weightlab adapter to the (original) base model it was trained on, as adapter ``name``
    (default: the name it was saved under, else "default")."""
    conf, tensors = read_folder(path)
    name = name or conf.get("name") or DEFAULT
    attach(model, conf["method"], targets=_exact(conf["targets"]), name=name, _init=False,
           rank_pattern=conf.get("rank_pattern") or None, alpha_pattern=conf.get("alpha_pattern") or None,
           **conf["config"])
    layers = adapter_layers(model, name)
    shared = {k[len(SHARED):]: v for k, v in tensors.items() if k.startswith(SHARED)}
    if shared:
        next(iter(layers.values())).methods[name].load_shared_state(shared)
    for n, m in layers.items():
        sub = {k[len(n) + 1:]: v for k, v in tensors.items() if k.startswith(n + ".")}
        mod = m.adapter_module(name)
        missing = set(mod.state_dict()) - set(sub)
        if missing:
            raise ConfigError(f"{path}: adapter tensors missing for layer '{n}': {sorted(missing)}")
        mod.load_state_dict(sub)
        with torch.no_grad(), m.using(name):
            W0 = m.weight_2d().detach().float()
            Wb = m.method.rebase(m, W0)
            if Wb is not W0:
                set_weight_2d(m.base_layer, Wb)
    return model


def _exact(names: list[str]) -> str:
    return "(" + "|".join(re.escape(n) for n in names) + ")"


def merge(model: nn.Module, unload: bool = True) -> nn.Module:
    """Deprecated name of :func:`fold` (it collided with ``weightlab.merge``, the model-merging family)."""
    import warnings

    warnings.warn("weightlab.adapt.merge is now weightlab.adapt.fold", DeprecationWarning, stacklevel=2)
    return fold(model, unload)


def unmerge(model: nn.Module) -> nn.Module:
    """Deprecated name of :func:`unfold`."""
    import warnings

    warnings.warn("weightlab.adapt.unmerge is now weightlab.adapt.unfold", DeprecationWarning, stacklevel=2)
    return unfold(model)
