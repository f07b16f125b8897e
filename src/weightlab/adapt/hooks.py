"""Per-step hooks over the active adapters: regularizers (SORSA), model-wide step hooks (PST, SaRA, DSEE) and
the optimizer the active method prescribes. Each active adapter's hooks run with its own tensors
(``layer.using(name)``); folded adapters take no part."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .layer import AdapterLayer
from .named import active_adapters, adapter_layers, adapter_names


def _live(model: nn.Module):
    """(adapter name, layer) for every active, unfolded adapter on every layer."""
    for lay in adapter_layers(model).values():
        for a in lay.active:
            if a not in lay.merged_names:
                yield a, lay


def regularizers(model: nn.Module) -> torch.Tensor:
    """Sum of the active adapters' weighted regularizers (SORSA: gamma/lr_base * L_orth); 0 if none.

    SORSA applies its term AFTER gradient clipping: call ``backward()`` on the task loss,
    clip, then :func:`backward_regularizers` (which adds the regularizer's gradient unclipped),
    then ``optimizer.step()``. Any loop can instead add ``regularizers(model)`` to the loss
    when the clipping placement does not matter to it.
    """
    terms: dict[str, list] = {}
    weights: dict[str, float] = {}
    for a, m in _live(model):
        with m.using(a):
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
    """Unweighted regularizer values per method of the active adapters (for logging: SORSA's L_orth)."""
    out: dict[str, list] = {}
    for m in adapter_layers(model).values():
        for a in m.active:
            with m.using(a):
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

    Call after each optimizer step with the number of steps done (1-based) and the total; every active
    adapter gets its own call with its layers.
    """
    groups: dict[tuple[str, type], list[AdapterLayer]] = {}
    for a, m in _live(model):
        groups.setdefault((a, type(m.methods[a])), []).append(m)
    for (a, cls), layers in groups.items():
        prev = [m._current for m in layers]
        for m in layers:
            m._current = a  # the method's model-wide hook reads layer.method / layer.adapter
        try:
            cls.on_model_step(layers, step, total_steps)
        finally:
            for m, p in zip(layers, prev):
                m._current = p


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer the (first) active adapter's method prescribes (AdamW; GradNormLoRP's projected AdamW)."""
    layers = list(adapter_layers(model).values())
    if not layers:
        raise ConfigError("the model has no adapter attached")
    act = active_adapters(model)
    if not act and adapter_names(model):
        raise ConfigError(f"no adapter is active (attached: {adapter_names(model)}); set_active(model, name) first")
    lay = next((m for m in layers if act and act[0] in m.methods), layers[0])
    meth = lay.methods[act[0]] if act else lay.method
    params = [p for p in model.parameters() if p.requires_grad]
    return meth.make_optimizer(params, lr, meth.cfg, weight_decay)
