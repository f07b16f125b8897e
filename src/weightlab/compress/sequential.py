"""Compress a checkpoint that is never loaded whole: prune / quantize / compensate with sequential onloading.

One job for the CLI, the recipe steps and the Python API: build the skeleton (engine/onload.py),
check the memory budget before any work (engine/budget.py), then run the verb with every block
onloaded, compressed, written through the streaming writer and freed. Untouched tensors
(embeddings, norms, head) are copied from the input afterwards. Several processes
(torchrun) split the calibration samples; rank 0 alone writes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field

from ..engine.budget import check_budget, parse_budget
from ..engine.device import configure_allocator, device_policy
from ..engine.distributed import current as current_dist
from ..errors import ConfigError
from ..io.provenance import Provenance
from ..io.writer import CheckpointWriter
from ..registry import MethodConfig


class PlacementFields(MethodConfig):
    """Where a recipe step computes: the same policy as the CLI's --device/--dtype."""

    device: str = Field("auto", description="auto (first accelerator, else cpu), cpu, cuda, cuda:N or mps")
    dtype: str = Field("auto", description="forward dtype: auto, bf16, fp16 or fp32")
    sequential: bool | None = Field(None, description="onload one block at a time (default for causal LMs when "
                                                      "the method allows it); false: the whole model in memory")
    offload_activations: bool = Field(False, description="keep calibration activations on the CPU")
    max_memory: str | None = Field(None, description="memory budget checked before any work, e.g. 8GB")

    def placement(self, checkpoint_dtype_: torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
        return device_policy(self.device, self.dtype, checkpoint_dtype_)


@dataclass
class Placement:
    """Where and how a sequential job computes (one object for the CLI, recipes and the API)."""

    device: str = "auto"
    dtype: str = "auto"
    offload_activations: bool = False
    max_memory: str | None = None
    distributed: bool | None = None
    max_shard_size: str = "5GB"


def checkpoint_dtype(ck) -> torch.dtype | None:
    """The checkpoint's floating dtype (what forward dtype 'auto' keeps on accelerators)."""
    for n in ck.names():
        dt = ck.info(n).dtype
        if dt.is_floating_point:
            return dt
    return None


def open_onloaded(path, task: str, placement: Placement):
    """(OnloadedModel, device, dtype, dist) under the device policy; errors before any work."""
    from ..engine.onload import OnloadedModel
    from ..io.reader import open_checkpoint

    configure_allocator()
    with open_checkpoint(path) as ck:
        model_dtype = checkpoint_dtype(ck)
    dev, dt = device_policy(placement.device, placement.dtype, model_dtype)
    dist = current_dist(placement.distributed)
    return OnloadedModel(path, task, device=dev, dtype=dt), dev, dt, dist


def run_sequential(verb: str, path: str | os.PathLike, out: str | os.PathLike, *, task: str = "causal-lm",
                   placement: Placement | None = None, provenance: Provenance | None = None, force: bool = False,
                   tokenizer=None, original=None, hessian: bool = True, extra_files: dict | None = None,
                   show_progress: bool | None = None, on_block_written=None, on_finish=None, data: bool | None = None,
                   **kwargs):
    """Run ``verb`` ('prune', 'quantize', 'compensate') on the checkpoint at ``path`` and write ``out``.

    ``kwargs`` go to the verb (method, sparsity/bits/rank, calib, nsamples, seqlen, ...). Returns
    (report, info) where info holds the memory estimate and the device used. ``original``
    (compensate) is the uncompressed checkpoint's path. ``on_block_written(i, name, tensors, codes)``
    may replace a block's tensors before they are written (codes: that block's integer layers);
    ``on_finish(skeleton) -> (extra files, model-card facts)`` runs before the output is published.
    ``data``: whether the verb caches calibration activations (default: with a Hessian, and compensate;
    AWQ needs them without one), for the memory estimate.
    """
    from ..io.reader import open_checkpoint

    placement = placement or Placement()
    onload, dev, dt, dist = open_onloaded(path, task, placement)
    needs_data = (hessian or verb == "compensate") if data is None else data
    nsamples, seqlen = kwargs.get("nsamples", 32), kwargs.get("seqlen", 512)
    precision = kwargs.get("precision", "auto")  # GPTQ/SparseGPT solver dtype (tensor/obs.solver_dtype)
    solver_bytes = 8 if (precision == "float64" or (precision == "auto" and dev.type == "cpu")) else 4
    estimate = check_budget(onload, nsamples=nsamples if needs_data else 0, seqlen=seqlen, batch_size=4,
                            hessian=hessian, budget=parse_budget(placement.max_memory),
                            offload_activations=placement.offload_activations, solver_bytes=solver_bytes)
    main = dist is None or dist.is_main
    writer = None
    if main:
        writer = CheckpointWriter(out, template=path, provenance=provenance, force=force,
                                  inputs=[path] + ([original] if original else []),
                                  max_shard_size=placement.max_shard_size)

    # integer codes of quantized layers reach the writer hook block by block and are dropped after it,
    # so the codes of the whole model (one byte per weight) are never held at once
    sink = {} if verb == "quantize" else None
    if sink is not None:
        kwargs["quantized_sink"] = sink

    def after_block(i, name, block):
        codes = {n: sink.pop(n) for n in list(sink) if n.startswith(f"{name}.")} if sink is not None else {}
        if writer is not None:
            state = onload.block_state(i)
            if on_block_written is not None:
                state = on_block_written(i, name, state, codes)
            for n, t in state.items():
                writer.add(n, t)

    common = dict(device=dev, after_block=after_block, dist=dist, offload_activations=placement.offload_activations,
                  show_progress=show_progress)
    ock = None
    try:
        if verb == "prune":
            from .prune import prune

            report = prune(onload, tokenizer=tokenizer, **common, **kwargs)
        elif verb == "quantize":
            from .quantize import quantize

            report = quantize(onload, tokenizer=tokenizer, **common, **kwargs)
        elif verb == "compensate":
            from .compensate import compensate

            if original is None:
                raise ConfigError("compensate needs the original (uncompressed) model")
            from types import SimpleNamespace

            ock = open_checkpoint(original)
            ref = SimpleNamespace(ck=ock, checkpoint_name=onload.checkpoint_name)  # the same names in both
            report = compensate(onload, ref, tokenizer=tokenizer, **common, **kwargs)
        else:
            raise ConfigError(f"unknown sequential verb {verb!r}")
        if writer is not None:
            if on_finish is not None:
                files, card = on_finish(onload.model)
                extra_files = {**(extra_files or {}), **files}
                if card and provenance is not None:
                    from .cards import merge_card

                    provenance.card = merge_card(provenance.card, card)
            for n in onload.resident_checkpoint_names():
                writer.add(n, onload.ck.get(n))
                onload.ck.release(n)
            for fname, content in (extra_files or {}).items():
                writer.add_file(fname, content)
            writer.close()
        if dist is not None:
            dist.barrier()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        onload.close()
        if ock is not None:
            ock.close()
    info = {"device": str(dev), "dtype": str(dt).replace("torch.", ""), "sequential": True,
            "world_size": dist.world if dist is not None else 1,
            "memory_estimate": {"block": estimate["block"], "host_bytes": estimate["host_bytes"],
                                "device_bytes": estimate["device_bytes"]}}
    return report, info


def write_report(out: str | os.PathLike, name: str, result: dict) -> Path:
    """Add (or replace) the JSON report inside a published output folder, atomically."""
    from ..io.atomic import write_file_atomic

    return write_file_atomic(Path(out) / name, json.dumps(result, indent=1, default=str))
