"""Which modules a layer-by-layer engine works on, and their weights as (out, in) matrices.

Blocks are the largest nn.ModuleList of identical modules; the layers inside are Linear, HF Conv1D
(GPT-2, weight stored (in, out)) and groups=1 Conv2d (kernel flattened to out x in*kh*kw).
"""
from __future__ import annotations

import torch
from torch import nn


def find_blocks(model: nn.Module, min_len: int = 2) -> tuple[str, nn.ModuleList | None]:
    """(qualified name, ModuleList) of the repeated blocks holding most parameters, or ("", None).

    In memory a one-block list is treated as no list (the model is one block); onloading passes
    ``min_len=1`` because a one-layer checkpoint still has to be read block-wise.
    """
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= min_len and len({type(c) for c in mod}) == 1:
            n = sum(p.numel() for p in mod.parameters())
            if best is None or n > best[2]:
                best = (name, mod, n)
    return (best[0], best[1]) if best else ("", None)


def is_conv1d_hf(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")  # GPT-2 style, weight is (in, out)


def prunable_layers(root: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """Linear, HF Conv1D and groups=1 Conv2d modules below ``root`` (qualified names)."""
    out = {}
    for name, mod in root.named_modules():
        if isinstance(mod, nn.Linear) or is_conv1d_hf(mod) or (isinstance(mod, nn.Conv2d) and mod.groups == 1):
            out[f"{prefix}.{name}" if prefix and name else (prefix or name)] = mod
    return out


def weight_matrix(mod: nn.Module) -> torch.Tensor:
    """A float32 copy of the layer's weight as (out, in) (conv kernels flattened to out x in*kh*kw).

    Always a copy: callers change the module's weight and must keep the original intact.
    """
    w = mod.weight.detach()
    if is_conv1d_hf(mod):
        w = w.T
    return w.reshape(w.shape[0], -1).to(torch.float32, copy=True)


def weight_view(mod: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in) without copying (read-only use: shapes, allocation scores)."""
    w = mod.weight.detach()
    if is_conv1d_hf(mod):
        w = w.T
    return w.reshape(w.shape[0], -1)


def set_weight_matrix(mod: nn.Module, w: torch.Tensor) -> None:
    with torch.no_grad():
        if is_conv1d_hf(mod):
            mod.weight.copy_(w.T.to(mod.weight.dtype))
        else:
            mod.weight.copy_(w.reshape(mod.weight.shape).to(mod.weight.dtype))
