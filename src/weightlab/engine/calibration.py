"""Layer-by-layer calibration regime.

Finds the model's repeated blocks (the largest nn.ModuleList of identical modules), captures
the inputs of the first block for every calibration batch, then for each block in turn:
forward hooks on its real Linear/Conv modules accumulate statistics (feature norms, the
Hessian proxy 2/N X^T X in float32), a callback compresses the block, and the block is run
again so its compressed outputs become the next block's inputs. No tracing: hooks on the
modules the model really calls. Memory is one block's statistics plus the cached
activations (nsamples x seqlen x hidden floats). Models without a block list (small MLPs,
CNNs) are one block.
"""
from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .memory import release_freed_memory
from .progress import progress


class _Stop(Exception):
    pass


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList | None]:
    """(qualified name, ModuleList) of the repeated blocks holding most parameters, or ("", None)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len({type(c) for c in mod}) == 1:
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


@dataclass
class LayerStats:
    """Running statistics of one layer's inputs, averaged over sequences (as Wanda/SparseGPT do)."""

    module: nn.Module
    hessian: bool = True
    nsamples: int = 0
    sq_norms: torch.Tensor | None = None  # mean over sequences of sum over tokens of x_j^2
    H: torch.Tensor | None = None  # (2 / N_seq) sum x x^T

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if isinstance(m, nn.Conv2d):
            cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            return cols.transpose(1, 2).reshape(-1, cols.shape[1])
        return x.reshape(-1, x.shape[-1])

    def add(self, x: torch.Tensor) -> None:
        batch = x.shape[0] if x.dim() > 2 else 1
        rows = self._rows(x.detach()).float()
        n_new = self.nsamples + batch
        if self.sq_norms is None:
            self.sq_norms = torch.zeros(rows.shape[1])
        self.sq_norms.mul_(self.nsamples / n_new).add_((rows * rows).sum(0) / n_new)
        if self.hessian:
            if self.H is None:
                self.H = torch.zeros(rows.shape[1], rows.shape[1])
            self.H.mul_(self.nsamples / n_new)
            r = rows * math.sqrt(2 / n_new)
            self.H.addmm_(r.T, r)
        self.nsamples = n_new

    def hook(self, mod, inputs, output) -> None:
        self.add(inputs[0])

    @property
    def feature_norms(self) -> torch.Tensor:
        """sqrt of the per-sequence mean of sum_tokens x_j^2: Wanda's ||x_j||_2 / sqrt(N_seq)."""
        return self.sq_norms.sqrt()


@dataclass
class BlockInputs:
    args: list = field(default_factory=list)
    kwargs: list = field(default_factory=list)


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_inputs(model: nn.Module, first_block: nn.Module, batches: list) -> BlockInputs:
    """Run the model on each batch until the first block and keep that block's inputs."""
    cap = BlockInputs()

    def pre_hook(mod, args, kwargs):
        cap.args.append(args)
        cap.kwargs.append(kwargs)
        raise _Stop

    h = first_block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    _call(model, b)
                except _Stop:
                    pass
    finally:
        h.remove()
    # each aborted forward leaves its frames (holding that batch's hidden states) in a reference cycle
    # with the _Stop traceback; without a collection they would outlive their replacement by the outputs
    gc.collect()
    return cap


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def layerwise(model: nn.Module, batches: list, on_block: Callable, *, hessian: bool = True,
              layer_filter: Callable[[str], bool] | None = None, show_progress: bool | None = None) -> None:
    """Run ``on_block(index, block_name, layers, stats)`` for each block in order.

    ``layers`` maps qualified names to modules; ``stats`` maps the same names to LayerStats
    gathered on this block's real inputs (which already went through the compressed
    earlier blocks). After the callback the block is re-run to produce the next inputs.
    """
    name, blocks = find_blocks(model)
    model.eval()
    if blocks is None:  # a small model: the whole model is one block
        layers = {n: m for n, m in prunable_layers(model).items() if layer_filter is None or layer_filter(n)}
        stats = _collect(layers, lambda: [_call(model, b) for b in batches], hessian)
        on_block(0, "", layers, stats)
        return
    cap = capture_inputs(model, blocks[0], batches)
    if not cap.args and not cap.kwargs:
        raise ConfigError("no calibration batch reached the model's first block")
    inputs = list(zip(cap.args, cap.kwargs))
    del cap  # `inputs` is the only holder, so each batch's input is freed as soon as its output replaces it
    for i, block in enumerate(progress(list(blocks), "calibrating blocks", enabled=show_progress)):
        prefix = f"{name}.{i}" if name else str(i)
        layers = {n: m for n, m in prunable_layers(block, prefix).items() if layer_filter is None or layer_filter(n)}
        with torch.no_grad():
            stats = _collect(layers, lambda: _run_each(block, inputs), hessian)
            on_block(i, prefix, layers, stats)
            del stats
            _propagate(block, inputs)
        release_freed_memory()


def _propagate(block: nn.Module, inputs: list) -> None:
    """Replace each cached input by the block's output, in place: one batch more than the cache, not two caches."""
    for j in range(len(inputs)):
        a, k = inputs[j]
        inputs[j] = _with_hidden(a, k, _block_output(block(*a, **k)))


def _run_each(block: nn.Module, inputs: list) -> None:
    for a, k in inputs:  # outputs are dropped at once: only the hooks' statistics are wanted
        block(*a, **k)


def _collect(layers: dict, run: Callable, hessian: bool) -> dict[str, LayerStats]:
    stats = {n: LayerStats(m, hessian=hessian) for n, m in layers.items()}
    hooks = [m.register_forward_hook(stats[n].hook) for n, m in layers.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return stats
