"""attach / fold / unfold / detach / regularizers / save / load for every adapter method.

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
from .layer import AdapterLayer, layer_kind, set_weight_2d

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


def select_targets(model: nn.Module, targets, kinds: Iterable[str] = ("linear", "conv1d", "conv2d")) -> list[str]:
    """Module names selected by name suffixes (list), a regex (str), or "all-linear"."""
    kinds = tuple(kinds)
    cands = [(n, m) for n, m in model.named_modules() if n and layer_kind(m) is not None
             and not isinstance(m, AdapterLayer) and ".base_layer" not in f".{n}" and ".adapter." not in f".{n}."]
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
    return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def attach(model: nn.Module, method: str, targets="all-linear", *, _init: bool = True, **config) -> nn.Module:
    """Wrap the target layers with adapter ``method`` (registered in the "adapt" family); in place.

    ``targets``: name suffixes (``["q_proj", "v_proj"]``), a regex over full module names, or
    "all-linear" (every Linear/Conv1D except the output embedding). Afterwards only adapter
    tensors require grad. ``config`` are the method's parameters (paper defaults otherwise).
    """
    spec = get_method("adapt", method)
    cfg = spec.make_config(config)
    names = select_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    prepare = getattr(spec.fn, "prepare", None)  # (a non-adapter method fails below, with its own message)
    shared = prepare(model, names, cfg) if prepare is not None else None
    for n in names:
        mod = model.get_submodule(n)
        meth = spec.fn(cfg)
        meth.shared = shared
        if layer_kind(mod) not in meth.layer_kinds:
            raise ConfigError(f"adapter '{spec.name}' does not support layer '{n}' ({type(mod).__name__}); "
                              f"choose targets among {', '.join(meth.layer_kinds)} layers")
        _set_module(model, n, AdapterLayer(mod, meth, n, init=_init))
    for m in adapter_layers(model).values():
        for p in m.adapter.parameters():
            p.requires_grad_(True)
    model._weightlab_adapter = {"method": spec.name, "config": cfg.model_dump(mode="json")}
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))


def fold(model: nn.Module, unload: bool = True) -> nn.Module:
    """Fold every adapter into its layer (float32 math, one rounding to the weight's dtype).

    ``unload=True`` (default) puts the plain base layers back: a model with no adapter code and no
    added latency. ``unload=False`` keeps the wrappers marked merged so ``unfold`` can undo it.
    """
    for n, m in adapter_layers(model).items():
        if not m.merged:
            Wm = m.merged_weight()
            bias = m.method.merged_bias(m)
            if not unload and not m.method.invertible:
                m._premerge = m.weight_2d().detach().clone()  # undo by restoring (not invertible)
                if bias is not None:
                    m._premerge_bias = m.base_layer.bias.detach().clone()
            set_weight_2d(m.base_layer, Wm)
            if bias is not None:
                with torch.no_grad():
                    m.base_layer.bias.copy_(bias.to(m.base_layer.bias.dtype))
            m.merged = True
        if unload:
            _set_module(model, n, m.base_layer)
    if unload and hasattr(model, "_weightlab_adapter"):
        del model._weightlab_adapter
    return model


def _restore(m: AdapterLayer) -> None:
    """The weights (and a bias the fold changed) of a folded layer as they were before the fold."""
    with torch.no_grad():
        W = (m.__dict__.pop("_premerge") if "_premerge" in m.__dict__
             else m.method.unmerge(m, m.weight_2d().detach().float()))
        set_weight_2d(m.base_layer, W)
        if "_premerge_bias" in m.__dict__:
            m.base_layer.bias.copy_(m.__dict__.pop("_premerge_bias"))


def unfold(model: nn.Module) -> nn.Module:
    """Undo ``fold(model, unload=False)`` (exact in float64 math for additive deltas; Bat inverts (I+T))."""
    for m in adapter_layers(model).values():
        if m.merged:
            _restore(m)
            m.merged = False
    return model


def detach(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging; the layers get their original weights back."""
    for n, m in adapter_layers(model).items():
        if m.merged:
            _restore(m)
        if m.method.changes_base:
            set_weight_2d(m.base_layer, m.method.original_weight(m))
        _set_module(model, n, m.base_layer)
    if hasattr(model, "_weightlab_adapter"):
        del model._weightlab_adapter
    return model


def regularizers(model: nn.Module) -> torch.Tensor:
    """Sum of the methods' weighted regularizers (SORSA: gamma/lr_base * L_orth); 0 if none.

    SORSA applies its term AFTER gradient clipping: call ``backward()`` on the task loss,
    clip, then :func:`backward_regularizers` (which adds the regularizer's gradient unclipped),
    then ``optimizer.step()``. Any loop can instead add ``regularizers(model)`` to the loss
    when the clipping placement does not matter to it.
    """
    terms: dict[str, list] = {}
    weights: dict[str, float] = {}
    for m in adapter_layers(model).values():
        if m.merged:
            continue
        r = m.method.regularizer(m)
        if r is not None:
            val, count = r
            terms.setdefault(m.method.name, []).append((val, count))
            weights[m.method.name] = m.method.regularizer_weight()
    total = None
    for name, vals in terms.items():
        n = sum(c for _, c in vals)
        term = weights[name] * torch.stack([v for v, _ in vals]).sum() / n
        total = term if total is None else total + term
    if total is None:
        dev = next(model.parameters()).device
        return torch.zeros((), device=dev)
    return total


def regularizer_values(model: nn.Module) -> dict[str, float]:
    """Unweighted regularizer values per method (for logging: SORSA's L_orth)."""
    out: dict[str, list] = {}
    for m in adapter_layers(model).values():
        r = m.method.regularizer(m)
        if r is not None:
            out.setdefault(m.method.name, []).append(r)
    return {k: float(sum(float(v.detach()) for v, _ in vs) / sum(c for _, c in vs)) for k, vs in out.items()}


def backward_regularizers(model: nn.Module) -> float:
    """Backpropagate the regularizers (call after clipping the task gradients, before step)."""
    reg = regularizers(model)
    if reg.requires_grad:
        reg.backward()
    return float(reg.detach())


def step_hooks(model: nn.Module, step: int, total_steps: int) -> None:
    """Per-step method behaviour (PST's sparsity schedule, SaRA's re-selection, DSEE's pruning).

    Call after each optimizer step with the number of steps done (1-based) and the total.
    """
    groups: dict[type, list[AdapterLayer]] = {}
    for m in adapter_layers(model).values():
        if not m.merged:
            groups.setdefault(type(m.method), []).append(m)
    for cls, layers in groups.items():
        cls.on_model_step(layers, step, total_steps)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer the attached method prescribes (AdamW; GradNormLoRP's projected AdamW)."""
    layers = list(adapter_layers(model).values())
    if not layers:
        raise ConfigError("the model has no adapter attached")
    meth = layers[0].method
    return meth.make_optimizer(trainable_parameters(model), lr, meth.cfg, weight_decay)


# -- weightlab adapter folders -------------------------------------------------------------
def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = {}
    for n, m in adapter_layers(model).items():
        for k, t in m.adapter.state_dict().items():
            sd[f"{n}.{k}"] = t.detach().contiguous()
    return sd


def save(model: nn.Module, out_dir, *, force: bool = False, base_model: str | None = None) -> Path:
    """Write a weightlab adapter folder (adapter.safetensors + adapter_config.json), atomically."""
    from safetensors.torch import save_file

    from ..io.atomic import AtomicFolder

    info = getattr(model, "_weightlab_adapter", None)
    layers = adapter_layers(model)
    if info is None or not layers:
        raise ConfigError("the model has no adapter attached")
    conf = {"format": FORMAT, "version": 1, "method": info["method"], "config": info["config"],
            "targets": sorted(layers), "base_model": base_model,
            "shapes": {n: [m.out_features, m.in_features] for n, m in layers.items()},
            "kinds": {n: m.kind for n, m in layers.items()},
            "conv_shapes": {n: list(m.base_layer.weight.shape) for n, m in layers.items() if m.kind == "conv2d"}}
    with AtomicFolder(out_dir, force=force) as tmp:
        shared = next(iter(layers.values())).method.shared_state()  # once, not per layer (VeRA's projections)
        sd = {**adapter_state(model), **{f"{SHARED}{k}": v.detach().cpu().contiguous() for k, v in shared.items()}}
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


def load(model: nn.Module, path) -> nn.Module:
    """Attach a saved weightlab adapter to the (original) base model it was trained on."""
    conf, tensors = read_folder(path)
    attach(model, conf["method"], targets=_exact(conf["targets"]), _init=False, **conf["config"])
    shared = {k[len(SHARED):]: v for k, v in tensors.items() if k.startswith(SHARED)}
    if shared:
        next(iter(adapter_layers(model).values())).method.load_shared_state(shared)
    for n, m in adapter_layers(model).items():
        sub = {k[len(n) + 1:]: v for k, v in tensors.items() if k.startswith(n + ".")}
        missing = set(m.adapter.state_dict()) - set(sub)
        if missing:
            raise ConfigError(f"{path}: adapter tensors missing for layer '{n}': {sorted(missing)}")
        m.adapter.load_state_dict(sub)
        with torch.no_grad():
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
