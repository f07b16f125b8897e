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
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .device import STAT_DTYPE, empty_cache, exact_matmul
from .memory import release_freed_memory
from .progress import progress


class _Stop(Exception):
    pass


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


class ShardCursor:
    """Which shard (simulated rank) the batch now running belongs to; shared by a block's LayerStats."""

    def __init__(self, shards: int = 1):
        self.shards = shards
        self.shard = 0


@dataclass
class LayerStats:
    """Raw sums of one layer's inputs and their sequence count; means are taken once, at the end.

    ``sq_norms`` (mean over sequences of sum over tokens of x_j^2) and ``H`` (2/N sum x x^T, the
    Hessian proxy of SparseGPT/GPTQ) divide the sums by N = the number of sequences, as the
    references average over calibration samples. Sums (not running means) are what several
    processes can add up; with ``cursor.shards > 1`` one partial sum is kept per simulated rank and
    they are added in rank order, which is exactly what a 2-process all-reduce computes.
    Accumulation is float32 on the device of the inputs (TF32 off: see device.exact_matmul).
    """

    module: nn.Module
    hessian: bool = True
    cursor: ShardCursor | None = None
    _sq: list = field(default_factory=list)
    _xtx: list = field(default_factory=list)
    _n: list = field(default_factory=list)
    _final: tuple | None = None

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if isinstance(m, nn.Conv2d):
            cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            return cols.transpose(1, 2).reshape(-1, cols.shape[1])
        return x.reshape(-1, x.shape[-1])

    def add(self, x: torch.Tensor) -> None:
        batch = x.shape[0] if x.dim() > 2 else 1
        rows = self._rows(x.detach()).to(STAT_DTYPE)
        k = self.cursor.shard if self.cursor is not None else 0
        while len(self._n) <= k:
            self._sq.append(torch.zeros(rows.shape[1], dtype=STAT_DTYPE, device=rows.device))
            self._xtx.append(torch.zeros(rows.shape[1], rows.shape[1], dtype=STAT_DTYPE, device=rows.device)
                             if self.hessian else None)
            self._n.append(0)
        self._sq[k].add_((rows * rows).sum(0))
        if self.hessian:
            self._xtx[k].addmm_(rows.T, rows)
        self._n[k] += batch
        self._final = None

    def hook(self, mod, inputs, output) -> None:
        self.add(inputs[0])

    def _fold(self):
        """(sum x^2, sum x x^T, N) with partial sums added in shard order."""
        if self._final is None:
            sq = xtx = None
            for s, h in zip(self._sq, self._xtx):
                sq = s if sq is None else sq + s
                xtx = h if xtx is None else (xtx + h if h is not None else xtx)
            self._final = (sq, xtx, sum(self._n))
        return self._final

    def reduce_(self, dist, width: int, device) -> None:
        """All-reduce (SUM) the sums and the count over the process group (zeros on a rank with no batch)."""
        sq, xtx, n = self._fold()
        if sq is None:
            sq = torch.zeros(width, dtype=STAT_DTYPE, device=device)
            xtx = torch.zeros(width, width, dtype=STAT_DTYPE, device=device) if self.hessian else None
        cnt = torch.tensor([n], dtype=torch.int64, device=sq.device)
        dist.all_reduce_(sq)
        if xtx is not None:
            dist.all_reduce_(xtx)
        dist.all_reduce_(cnt)
        self._sq, self._xtx, self._n, self._final = [sq], [xtx], [int(cnt)], None

    @property
    def nsamples(self) -> int:
        return self._fold()[2]

    @property
    def sq_norms(self) -> torch.Tensor | None:
        sq, _, n = self._fold()
        return None if sq is None else sq / max(n, 1)

    @property
    def H(self) -> torch.Tensor | None:  # noqa: N802 - the papers' name
        _, xtx, n = self._fold()
        return None if xtx is None else xtx * (2 / max(n, 1))

    def take_H(self) -> torch.Tensor | None:  # noqa: N802
        """``H``, scaled in place from the raw sum and handed over: the statistics no longer hold it, so a
        solver may factor it in place (one d_in x d_in matrix instead of three at the peak)."""
        sq, xtx, n = self._fold()
        if xtx is None:
            return None
        self._xtx, self._final = [None] * len(self._xtx), (sq, None, n)
        return xtx.mul_(2 / max(n, 1))

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
                    _call(model, to_device(b, dev))
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


def layerwise(model: nn.Module | None, batches: list, on_block: Callable, *, hessian: bool = True,
              layer_filter: Callable[[str], bool] | None = None, show_progress: bool | None = None,
              device: torch.device | str | None = None, onload=None, after_block: Callable | None = None,
              dist=None, shards: int = 1, offload_activations: bool = False) -> None:
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
    """
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
                _call(model, to_device(b, dev))

        stats = _collect(layers, run_all, hessian, cursor)
        _finish_stats(stats, layers, dist, dev)
        if dist is None or dist.is_main:
            with exact_matmul():
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
            stats = _collect(layers, lambda: _run_each(block, inputs, dev, cursor, shard_ids), hessian, cursor)
            _finish_stats(stats, layers, dist, dev)
            if dist is None or dist.is_main:
                with exact_matmul():
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
