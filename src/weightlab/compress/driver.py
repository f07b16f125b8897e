"""The per-layer loop prune, quantize and compensate share.

``for_each_layer(model, layers, fn, ...)`` calls ``fn(names_to_modules, stats)`` on the target
layers block by block. Without statistics it walks the blocks (onloading them, or moving them to
the device) or, for an in-memory model on its own device, the layers directly; with statistics it
runs the layer-by-layer calibration engine, so each block's inputs went through the already
compressed blocks before it. ``block_step`` (with statistics only) runs on each block before ``fn``
(engine.calibration.layerwise's: a transform that needs the block's forward, such as AWQ).
"""
from __future__ import annotations

from ..engine.calibration import each_block, layerwise
from ..engine.progress import progress


def for_each_layer(model, layers: dict, fn, *, stats: bool, hessian: bool = False, batches=None, label: str = "",
                   device=None, onload=None, after_block=None, dist=None, shards: int = 1,
                   offload_activations: bool = False, show_progress: bool | None = None,
                   block_step=None, layer_stats: bool = True) -> None:
    keep = layers.__contains__
    if not stats:
        if block_step is not None:
            raise ValueError("a block step needs the calibration engine (stats=True)")
        if onload is not None or device is not None:
            each_block(model, lambda i, name, ls: fn(ls, None), layer_filter=keep, device=device, onload=onload,
                       after_block=after_block, show_progress=show_progress)
        else:
            fn(dict(progress(list(layers.items()), label, enabled=show_progress)), None)
        return
    layerwise(model, batches, lambda i, name, ls, st: fn(ls, st), hessian=hessian, layer_filter=keep,
              show_progress=show_progress, device=device, onload=onload, after_block=after_block, dist=dist,
              shards=shards, offload_activations=offload_activations, block_step=block_step,
              layer_stats=layer_stats)
