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
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from .device import empty_cache, exact_matmul
# the layer and statistics helpers live in layers.py / stats.py; imported here too, where callers know them
from .layers import (find_blocks, is_conv1d_hf, prunable_layers, set_weight_matrix,  # noqa: F401
                     weight_matrix, weight_view)
from .memory import release_freed_memory
from .stats import LayerStats, ShardCursor  # noqa: F401
from .progress import progress


class _Stop(Exception):
    pass


@dataclass
class BlockInputs:
    args: list = field(default_factory=list)
    kwargs: list = field(default_factory=list)


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def to_device(obj, device):
    """Tensors inside nested tuples/lists/dicts moved to ``device`` (other objects unchanged)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True) if obj.device != device else obj
    if isinstance(obj, tuple):
        return tuple(to_device(x, device) for x in obj)
    if isinstance(obj, list):
        return [to_device(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def module_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


def capture_inputs(model: nn.Module, first_block: nn.Module, batches: list) -> BlockInputs:
    """Run the model on each batch until the first block and keep that block's inputs."""
    cap = BlockInputs()
    dev = module_device(model)

    def pre_hook(mod, args, kwargs):
        cap.args.append(args)
        cap.kwargs.append(kwargs)
        raise _Stop

    h = first_block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    call_model(model, to_device(b, dev))
                except _Stop:
                    pass
    finally:
        h.remove()
    # each aborted forward leaves its frames (holding that batch's hidden states) in a reference cycle
    # with the _Stop traceback; without a collection they would outlive their replacement by the outputs
    gc.collect()
    return cap


def call_model(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@dataclass
class BlockRun:
    """One block during its turn in ``layerwise``: the module, its cached inputs, and a way to run it on them.

    Handed to a ``block_step`` (a transform that needs the block's own forward, such as AWQ's grid
    search) before the block's layers are compressed. ``forward(j)`` runs the block on cached input
    ``j`` on the compute device; for a model without a block list the block is the whole model and
    the inputs are the calibration batches. Tensors a step keeps across batches belong on
    ``cache_device`` (the CPU with ``offload_activations``).
    """

    index: int
    name: str  # qualified name of the block ("model.layers.3"; "" for a model that is one block)
    block: nn.Module
    device: torch.device
    cache_device: torch.device
    inputs: list
    whole_model: bool = False

    def __len__(self) -> int:
        return len(self.inputs)

    def forward(self, j: int):
        if self.whole_model:
            return call_model(self.block, to_device(self.inputs[j], self.device))
        a, k = self.inputs[j]
        return self.block(*to_device(a, self.device), **to_device(k, self.device))

    def qualified(self, local: str) -> str:
        """The model-level name of a module named ``local`` inside the block."""
        return f"{self.name}.{local}" if self.name and local else (self.name or local)


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def layerwise(model: nn.Module | None, batches: list, on_block: Callable, *, hessian: bool = True,
              layer_filter: Callable[[str], bool] | None = None, show_progress: bool | None = None,
              device: torch.device | str | None = None, onload=None, after_block: Callable | None = None,
              dist=None, shards: int = 1, offload_activations: bool = False,
              block_step: Callable | None = None, layer_stats: bool = True) -> None:
    """Run ``on_block(index, block_name, layers, stats)`` for each block in order.

    ``layers`` maps qualified names to modules; ``stats`` maps the same names to LayerStats
    gathered on this block's real inputs (which already went through the compressed
    earlier blocks). After the callback the block is re-run to produce the next inputs, then
    ``after_block(index, block_name, block)`` sees the finished block.

    ``device``: where blocks compute (an in-memory block is moved there for its turn and back).
    ``onload``: an OnloadedModel; its blocks are read from the checkpoint just before their turn
    and freed after ``after_block``. ``dist``: a DistContext; this rank calibrates its shard of
    ``batches``, statistics are all-reduced, rank 0 runs ``on_block`` and its weights are broadcast.
    ``shards`` > 1 (single process) keeps per-shard partial sums as ``shards`` ranks would.
    ``offload_activations``: the cached block inputs stay on the CPU, one batch at a time on the device.
    ``block_step(run, layers, stats)``: called just before ``on_block`` with a ``BlockRun``, for transforms
    that re-run parts of the block on its inputs (AWQ's smoothing); one process only (not with ``dist``).
    ``layer_stats=False``: no LayerStats pass (``stats`` is empty), for a block step that needs none.
    """
    if block_step is not None and dist is not None:
        raise ConfigError("this method re-runs parts of each block on all calibration inputs in one process; "
                          "it does not split them across processes (run it without torchrun)")
    if onload is not None:
        model = onload.model
    name, blocks = (onload.blocks_name, onload.blocks) if onload is not None else find_blocks(model)
    model.eval()
    dev = torch.device(device) if device is not None else module_device(model)
    if dist is not None:
        batches = dist.shard(batches)
        shard_ids = [0] * len(batches)
    else:
        from .distributed import shard_of

        shard_ids = shard_of(len(batches), shards)
    cursor = ShardCursor(shards if dist is None else 1)
    if blocks is None:  # a small model: the whole model is one block
        home = module_device(model)
        model.to(dev)
        layers = {n: m for n, m in prunable_layers(model).items() if layer_filter is None or layer_filter(n)}

        def run_all():
            for j, b in enumerate(batches):
                cursor.shard = shard_ids[j]
                call_model(model, to_device(b, dev))

        stats = _collect(layers, run_all, hessian, cursor) if layer_stats else {}
        _finish_stats(stats, layers, dist, dev)
        if dist is None or dist.is_main:
            with exact_matmul():
                if block_step is not None:
                    with torch.no_grad():
                        block_step(BlockRun(0, "", model, dev, dev, batches, whole_model=True), layers, stats)
                on_block(0, "", layers, stats)
        if dist is not None:
            dist.broadcast_module_(model)
        model.to(home)
        if after_block is not None:
            after_block(0, "", model)
        return
    cap = capture_inputs(model, blocks[0], batches)
    if not cap.args and not cap.kwargs and dist is None:
        raise ConfigError("no calibration batch reached the model's first block")
    cache_dev = torch.device("cpu") if offload_activations else dev
    inputs = [(to_device(a, cache_dev), to_device(k, cache_dev)) for a, k in zip(cap.args, cap.kwargs)]
    del cap  # `inputs` is the only holder, so each batch's input is freed as soon as its output replaces it
    for i in progress(range(len(blocks)), "calibrating blocks", enabled=show_progress):
        prefix = f"{name}.{i}" if name else str(i)
        if onload is not None:
            block, home = onload.load_block(i), None
        else:
            block, home = blocks[i], module_device(blocks[i])
            block.to(dev)
        layers = {n: m for n, m in prunable_layers(block, prefix).items() if layer_filter is None or layer_filter(n)}
        with torch.no_grad():
            stats = (_collect(layers, lambda: _run_each(block, inputs, dev, cursor, shard_ids), hessian, cursor)
                     if layer_stats else {})
            _finish_stats(stats, layers, dist, dev)
            if dist is None or dist.is_main:
                with exact_matmul():
                    if block_step is not None:
                        block_step(BlockRun(i, prefix, block, dev, cache_dev, inputs), layers, stats)
                    on_block(i, prefix, layers, stats)
            del stats
            if dist is not None:
                dist.broadcast_module_(block)
            _propagate(block, inputs, dev)
        if after_block is not None:
            after_block(i, prefix, block)
        if onload is not None:
            onload.free_block(i)
        elif home is not None and home != dev:
            block.to(home)
        release_freed_memory()
        empty_cache(dev)


def _finish_stats(stats: dict, layers: dict, dist, dev) -> None:
    if dist is None:
        return
    order = sorted(stats)
    widths = {n: _input_width(layers[n]) for n in order}
    dist.check_same([(n, widths[n]) for n in order], "layer statistics")
    for n in order:
        stats[n].reduce_(dist, widths[n], dev)


def _input_width(mod: nn.Module) -> int:
    if isinstance(mod, nn.Conv2d):
        return mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
    return weight_view(mod).shape[1]


def _propagate(block: nn.Module, inputs: list, dev) -> None:
    """Replace each cached input by the block's output, in place: one batch more than the cache, not two caches."""
    for j in range(len(inputs)):
        a, k = inputs[j]
        home = _first_device(a, k)
        out = _block_output(block(*to_device(a, dev), **to_device(k, dev)))
        if home is not None and home != dev:
            out = out.to(home)
        inputs[j] = _with_hidden(a, k, out)


def _first_device(a, k):
    for x in list(a) + list(k.values()):
        if isinstance(x, torch.Tensor):
            return x.device
    return None


def _run_each(block: nn.Module, inputs: list, dev, cursor: ShardCursor, shard_ids: list) -> None:
    for j, (a, k) in enumerate(inputs):  # outputs are dropped at once: only the hooks' statistics are wanted
        cursor.shard = shard_ids[j]
        block(*to_device(a, dev), **to_device(k, dev))


def _collect(layers: dict, run: Callable, hessian: bool, cursor: ShardCursor | None = None) -> dict[str, LayerStats]:
    stats = {n: LayerStats(m, hessian=hessian, cursor=cursor) for n, m in layers.items()}
    hooks = [m.register_forward_hook(stats[n].hook) for n, m in layers.items()]
    try:
        with torch.no_grad(), exact_matmul():
            run()
    finally:
        for h in hooks:
            h.remove()
    return stats


def each_block(model: nn.Module | None, on_block: Callable, *, layer_filter: Callable[[str], bool] | None = None,
               device: torch.device | str | None = None, onload=None, after_block: Callable | None = None,
               show_progress: bool | None = None) -> None:
    """``on_block(index, block_name, layers)`` for each block, without calibration data (data-free rules).

    The same onloading as ``layerwise``: a block is onloaded (or moved to ``device``) for its turn,
    handed to ``after_block`` and freed. Models without a block list are one block.
    """
    if onload is not None:
        model = onload.model
    name, blocks = (onload.blocks_name, onload.blocks) if onload is not None else find_blocks(model)
    dev = torch.device(device) if device is not None else module_device(model)
    if blocks is None:
        home = module_device(model)
        model.to(dev)
        with torch.no_grad(), exact_matmul():
            on_block(0, "", {n: m for n, m in prunable_layers(model).items()
                             if layer_filter is None or layer_filter(n)})
        model.to(home)
        if after_block is not None:
            after_block(0, "", model)
        return
    for i in progress(range(len(blocks)), "blocks", enabled=show_progress):
        prefix = f"{name}.{i}" if name else str(i)
        block = onload.load_block(i) if onload is not None else blocks[i]
        home = None if onload is not None else module_device(block)
        if onload is None:
            block.to(dev)
        layers = {n: m for n, m in prunable_layers(block, prefix).items() if layer_filter is None or layer_filter(n)}
        with torch.no_grad(), exact_matmul():
            on_block(i, prefix, layers)
        if after_block is not None:
            after_block(i, prefix, block)
        if onload is not None:
            onload.free_block(i)
        elif home != dev:
            block.to(home)
        release_freed_memory()
        empty_cache(dev)
