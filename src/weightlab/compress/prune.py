"""`wl.compress.prune`: one verb for every pruning rule, allocation and pattern.

Data-free rules (magnitude) walk the layers directly; data-aware rules (Wanda, SparseGPT,
GBLM, ...) run in the layer-by-layer calibration engine, so each block is pruned on inputs
that already passed through the pruned earlier blocks. The model is changed in place
(pruned weights set to zero; dense storage). Unstructured sparsity alone does not make
files smaller or dense matrix products faster; N:M (2:4) is what sparse kernels use.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..engine.result import Result
from ..engine.calibration import find_blocks, prunable_layers, set_weight_matrix, weight_matrix, weight_view
from ..errors import ConfigError
from ..registry import Regime, get_method, register
from ..tensor.pruning import parse_pattern
from .driver import for_each_layer
from .rules import LayerContext
from .sequential import PlacementFields

HONEST_NOTE = ("Pruned weights are stored as zeros in a dense model: unstructured sparsity does not shrink "
               "the files or speed up dense kernels; N:M patterns such as 2:4 are what sparse kernels accelerate.")


@dataclass
class PruneReport(Result):
    method: str
    target_sparsity: float
    pattern: str | None
    allocation: str
    layers: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    note: str = HONEST_NOTE

    @property
    def sparsity(self) -> float:
        total = sum(r["numel"] for r in self.layers)
        return sum(r["zeros"] for r in self.layers) / total if total else 0.0

    def as_dict(self) -> dict:
        return {"method": self.method, "target_sparsity": self.target_sparsity, "pattern": self.pattern,
                "allocation": self.allocation, "achieved_sparsity": self.sparsity, "seconds": round(self.seconds, 2),
                "layers": self.layers, "note": self.note}


def target_layers(model: nn.Module, blocks: tuple | None = None) -> dict[str, nn.Module]:
    """The layers a pruner touches: those inside the repeated blocks, else every Linear/Conv.

    ``blocks`` = (name, ModuleList) overrides the search (an OnloadedModel knows its blocks)."""
    name, blocks = blocks if blocks is not None else find_blocks(model)
    if blocks is None:
        return prunable_layers(model)
    return {n: m for i, b in enumerate(blocks) for n, m in prunable_layers(b, f"{name}.{i}").items()}


def to_batches(calib, tokenizer=None, nsamples: int = 32, seqlen: int = 512, seed: int = 0,
               sampling: str = "random", batch_size: int = 4) -> list:
    """Calibration batches from 'wiki', a file, a (n, seqlen) id tensor or a ready list of batches."""
    if isinstance(calib, list):
        return calib
    if isinstance(calib, torch.Tensor) and calib.dtype in (torch.int64, torch.int32):
        ids = calib
    elif isinstance(calib, torch.Tensor):
        return list(calib.split(batch_size))
    else:
        if tokenizer is None:
            raise ConfigError("text calibration data needs the model's tokenizer")
        from ..engine.calib_data import token_windows
        from ..io.refs import load_text

        ids = token_windows(tokenizer, load_text(calib or "wiki", "calib"), nsamples, seqlen, seed, sampling)
    return [{"input_ids": b, "use_cache": False} for b in ids.split(batch_size)]


def prune(model: nn.Module, method: str = "wanda", sparsity: float = 0.5, *, pattern: str | None = None,
          allocation: str = "uniform", calib=None, tokenizer=None, nsamples: int = 32, seqlen: int = 512,
          seed: int = 0, sampling: str = "random", show_progress: bool | None = None,
          device: str | torch.device | None = None, after_block=None, dist=None, shards: int = 1,
          offload_activations: bool = False, **method_params) -> PruneReport:
    """Prune ``model`` in place and return the per-layer report.

    ``model`` is an nn.Module (whole-model path: blocks computed on ``device`` one at a time) or an
    ``OnloadedModel`` (sequential onloading: blocks read from the checkpoint, handed to
    ``after_block(i, name, block)`` when finished, then freed). ``dist`` / ``shards``: see
    engine.calibration.layerwise.
    """
    t0 = time.perf_counter()
    onload = model if hasattr(model, "load_block") else None
    model = onload.model if onload is not None else model
    spec = get_method("compress", method)
    if spec.kind != "prune":
        raise ConfigError(f"compress/{spec.name} is not a pruning rule; rules: "
                          + ", ".join(s.name for s in _rules()))
    cfg = spec.make_config(method_params)
    if not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    try:
        nm = parse_pattern(pattern)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    alloc = get_method("compress", allocation)
    if alloc.kind != "allocate":
        raise ConfigError(f"'{allocation}' is not an allocation; use uniform, global, lamp, dimap or rd")
    if nm is not None and allocation != "uniform":
        raise ConfigError("an N:M pattern fixes the sparsity of every layer; use --allocation uniform")
    layers = target_layers(model, _blocks_of(onload))
    if not layers:
        raise ConfigError("the model has no Linear/Conv layers to prune")
    for n, m in layers.items():
        if nm is not None and weight_view(m).shape[1] % nm[1]:
            raise ConfigError(f"layer {n} has {weight_view(m).shape[1]} inputs, not a multiple of {nm[1]}")
    needs = set(spec.contract.needs)
    if onload is not None and ("gradients" in needs or spec.contract.prepare is not None or allocation == "rd"):
        why = "the RD allocation" if allocation == "rd" else f"{spec.name}'s whole-model gradient pass"
        raise ConfigError(f"{why} needs the whole model in memory; run it without sequential onloading "
                          "(--whole-model)")
    batches = to_batches(calib, tokenizer, nsamples, seqlen, seed, sampling) if (needs or allocation == "rd") else []

    if onload is not None and nm is None and allocation != "uniform":  # read straight from the checkpoint
        weights = {n: onload.weight_view(f"{n}.weight").reshape(weight_view(m).shape) for n, m in layers.items()}
    else:
        weights = {n: weight_view(m) for n, m in layers.items()}  # views: a copy of every weight would double memory
    kwargs = {"distortion": _distortion_fn(model, layers, batches[:2])} if allocation == "rd" else {}
    per_layer = {n: sparsity for n in layers} if nm else alloc.fn(weights, sparsity, **kwargs)
    del weights
    extra: dict = {}
    if "gradients" in needs:  # from the dense model, before any layer is pruned
        from .gradients import gradient_moments

        extra["moments"] = gradient_moments(model, batches, layers, show_progress)
    if spec.contract.prepare is not None:
        extra.update(spec.contract.prepare(model, layers, cfg, tokenizer=tokenizer, batches=batches, nsamples=nsamples,
                                           seqlen=seqlen, seed=seed, sampling=sampling, show_progress=show_progress))
    report = PruneReport(spec.name, sparsity, pattern, alloc.name)

    def prune_layers(names_mods, stats):
        for n, m in names_mods.items():
            w = weight_matrix(m)
            ctx = LayerContext(n, m, w, per_layer[n], nm, cfg, stats.pop(n, None) if stats else None, extra)
            new_w, mask = spec.fn(ctx)
            set_weight_matrix(m, new_w * mask)
            zeros = int((~mask).sum())
            report.layers.append({"name": n, "shape": list(w.shape), "target": per_layer[n], "numel": w.numel(),
                                  "zeros": zeros, "sparsity": zeros / w.numel()})

    for_each_layer(model, layers, prune_layers, stats=bool(needs & {"norms", "hessian"}), hessian="hessian" in needs,
                   batches=batches, label=f"prune/{spec.name}", device=device, onload=onload, after_block=after_block,
                   dist=dist, shards=shards, offload_activations=offload_activations, show_progress=show_progress)
    report.seconds = time.perf_counter() - t0
    return report


def _rules():
    from ..registry import list_methods

    return [s for s in list_methods("compress") if s.kind == "prune"]


def _distortion_fn(model: nn.Module, layers: dict, batches: list):
    """Output MSE of pruning one layer alone by magnitude (the RD paper's curves), on a few batches."""
    from ..engine.calibration import call_model
    from ..tensor.pruning import layer_mask

    def logits(out):
        return (out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out).float()

    with torch.no_grad():
        dense = [logits(call_model(model, b)) for b in batches]

    def distortion(name: str, amount: float) -> float:
        m = layers[name]
        w = weight_matrix(m)
        if amount <= 0:
            return 0.0
        set_weight_matrix(m, w * layer_mask(w.abs(), min(amount, 1.0 - 1e-9)))
        try:
            with torch.no_grad():
                return float(sum(((logits(call_model(model, b)) - d) ** 2).mean() for b, d in zip(batches, dense)))
        finally:
            set_weight_matrix(m, w)

    return distortion


class PruneStepConfig(PlacementFields):
    method: str = "wanda"
    sparsity: float | None = Field(None, ge=0, lt=1, description="default 0.5; an N:M pattern sets it to N/M")
    pattern: str | None = None
    allocation: str = "uniform"
    calib: str = "wiki"
    nsamples: int = Field(32, gt=0)
    seqlen: int = Field(512, gt=1)
    seed: int = 0
    sampling: Literal["random", "consecutive"] = "random"
    params: dict = Field(default_factory=dict, description="the pruning rule's own parameters")
    format: Literal["hf", "compressed-tensors"] = Field(
        "hf", description="both are written dense (no served sparse format exists); the sparsity goes in the card")


@register("compress", "prune", kind="transform", config=PruneStepConfig, regime=Regime.LAYERWISE,
          paper="(recipe step running a pruning rule; see the rules' papers)",
          summary="recipe step: prune a causal LM checkpoint with any rule, pattern and allocation", workdir=True)
def prune_step(source, cfg: PruneStepConfig, workdir, show_progress: bool | None = None):
    """The `weightlab prune` job on the model the previous step wrote (sequential for causal LMs)."""
    from ..io.reader import open_checkpoint
    from ..engine.source import step_folder
    from .jobs import prune_job, step_placement

    _, result = prune_job(step_folder(source), workdir / "pruned", cfg.method, cfg.sparsity, pattern=cfg.pattern,
                          allocation=cfg.allocation, calib=cfg.calib, nsamples=cfg.nsamples, seqlen=cfg.seqlen,
                          seed=cfg.seed, sampling=cfg.sampling, no_eval=True, params=cfg.params, fmt=cfg.format,
                          force=True, **step_placement(cfg))
    out = open_checkpoint(workdir / "pruned")
    out.report = {k: v for k, v in (result or {}).items() if k != "layers"}
    return out


def _blocks_of(onload) -> tuple | None:
    return (onload.blocks_name, onload.blocks) if onload is not None else None
