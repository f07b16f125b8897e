"""`compensate(compressed, original, method="eora"|"svd", rank)`: training-free low-rank repair.

For every target layer, dW = W_original - W_compressed is approximated by B A (rank r):
EoRA in the eigenspace of the layer's calibration inputs (tensor/eora.py), or plain SVD of dW
(the baseline, needs no data). EoRA runs block-sequentially in the calibration engine on the
*compressed* model, so each block's input statistics come from already-compensated blocks.
The result is merged into the weights (``merge=True``) or kept as adapters, which
``save_peft_adapter`` writes in PEFT's LoRA format (lora_A = A (r x in), lora_B = B (out x r),
lora_alpha = r so the scaling is 1).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..engine.result import Result
from ..engine.calibration import set_weight_matrix, weight_matrix, weight_view
from ..errors import ConfigError, WeightlabError
from ..registry import Regime, register
from ..tensor.eora import eora, svd_lowrank, weighted_error
from .driver import for_each_layer
from .prune import _blocks_of, target_layers, to_batches
from .sequential import PlacementFields


@dataclass
class CompensateReport(Result):
    method: str
    rank: int
    merged: bool
    layers: list[dict] = field(default_factory=list)
    adapters: dict = field(default_factory=dict)  # layer name -> (B, A)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        def tot(k):
            return sum(r[k] for r in self.layers if r.get(k) is not None)

        out = {"method": self.method, "rank": self.rank, "merged": self.merged, "seconds": round(self.seconds, 2),
               "adapter_params": sum(B.numel() + A.numel() for B, A in self.adapters.values()),
               "layers": self.layers}
        if any(r.get("err_before") is not None for r in self.layers):
            b = tot("err_before")
            out["input_weighted_error_ratio"] = round(tot("err_after") / b, 6) if b else None
        return out


def compensate(compressed: nn.Module, original, method: str = "eora", rank: int = 16, *,
               merge: bool = True, calib=None, tokenizer=None, nsamples: int = 32, seqlen: int = 512, seed: int = 0,
               sampling: str = "random", show_progress: bool | None = None, layer_filter=None,
               device: str | torch.device | None = None, after_block=None, dist=None, shards: int = 1,
               offload_activations: bool = False) -> CompensateReport:
    """Add rank-``rank`` corrections to ``compressed`` (changed in place when merge=True).

    ``original`` only provides the reference weights (same layer names): a module, an
    ``OnloadedModel`` or a ``Checkpoint`` (read one layer at a time). ``compressed`` may be an
    ``OnloadedModel`` (sequential onloading; ``after_block`` receives each finished block). With
    merge=False the compressed model is left unchanged and the adapters are in ``report.adapters``.
    """
    t0 = time.perf_counter()
    onload = compressed if hasattr(compressed, "load_block") else None
    compressed = onload.model if onload is not None else compressed
    if method not in ("eora", "svd"):
        raise ConfigError(f"compensation method must be 'eora' or 'svd', got {method!r}")
    if rank < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")
    layers = target_layers(compressed, _blocks_of(onload))
    if layer_filter is not None:
        layers = {n: m for n, m in layers.items() if layer_filter(n)}
    ref_shape, ref_weight = _reference(original)
    missing = [n for n in layers if ref_shape(n) is None]
    if missing:
        raise ConfigError(f"the original model has no layer {missing[0]} (different architecture?)")
    for n, m in layers.items():
        if tuple(weight_view(m).shape) != ref_shape(n):
            raise ConfigError(f"layer {n}: shapes differ between the compressed and the original model")
    report = CompensateReport(method, rank, merge)
    kept: dict[str, torch.Tensor] = {}

    def do_layers(names_mods, stats):
        for n, m in names_mods.items():
            Wc = weight_matrix(m)
            W0 = ref_weight(n).to(Wc.device)
            dW = W0 - Wc
            r = min(rank, *dW.shape)
            row = {"name": n, "shape": list(dW.shape), "rank": r}
            if stats is not None:
                C = stats.pop(n).H.double()
                B, A = eora(dW, C, r)
                row["err_before"] = weighted_error(dW, C)
                row["err_after"] = weighted_error(dW - B @ A, C)
            else:
                B, A = svd_lowrank(dW, r)
            row["rel_weight_error_before"] = float(dW.norm() / W0.norm().clamp_min(1e-30))
            row["rel_weight_error_after"] = float((dW - B @ A).norm() / W0.norm().clamp_min(1e-30))
            report.layers.append(row)
            report.adapters[n] = (B.cpu(), A.cpu())
            if not merge:
                kept[n] = Wc
            set_weight_matrix(m, Wc + B @ A)  # later blocks see compensated outputs

    def restore(names):  # merge=False: the compressed weights go back before the block is written
        for n in names:
            if n in kept:
                set_weight_matrix(layers[n], kept.pop(n))

    def finished(i, name, block):
        restore([n for n in list(kept) if n.startswith(f"{name}.") or not name])
        if after_block is not None:
            after_block(i, name, block)

    stats = method != "svd"
    for_each_layer(compressed, layers, do_layers, stats=stats, hessian=stats,
                   batches=to_batches(calib, tokenizer, nsamples, seqlen, seed, sampling) if stats else None,
                   label=f"compensate/{method}", device=device, onload=onload, after_block=finished, dist=dist,
                   shards=shards, offload_activations=offload_activations, show_progress=show_progress)
    restore(list(kept))
    report.seconds = time.perf_counter() - t0
    return report


def _reference(original):
    """(shape(name) -> tuple | None, weight(name) -> float32 (out, in) CPU tensor) for a module or a checkpoint."""
    if isinstance(original, nn.Module):
        mods = dict(original.named_modules())
        return ((lambda n: tuple(weight_view(mods[n]).shape) if n in mods else None),
                (lambda n: weight_matrix(mods[n]).cpu()))
    key = original.checkpoint_name if hasattr(original, "checkpoint_name") else (lambda k: k)
    ck = original.ck if hasattr(original, "ck") else original

    def name_of(n):
        try:
            k = key(f"{n}.weight")
        except WeightlabError:
            return None
        return k if k in ck else None

    def shape(n):
        k = name_of(n)
        if k is None:
            return None
        s = ck.info(k).shape
        return (s[0], math.prod(s[1:]))

    def weight(n):
        k = name_of(n)
        w = ck.get(k).to(torch.float32, copy=True)
        ck.release(k)
        return w.reshape(w.shape[0], -1)

    return shape, weight


def peft_state_dict(adapters: dict, dtype=torch.float32) -> dict[str, torch.Tensor]:
    out = {}
    for n, (B, A) in adapters.items():
        out[f"base_model.model.{n}.lora_A.weight"] = A.to(dtype).contiguous()
        out[f"base_model.model.{n}.lora_B.weight"] = B.to(dtype).contiguous()
    return out


def save_peft_adapter(out: str | os.PathLike, adapters: dict, base_model: str | None = None, rank: int | None = None,
                      task_type: str | None = "CAUSAL_LM", conv1d: bool = False, dtype=torch.float32, *,
                      force: bool = False, inputs=(), extra_files: dict | None = None) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT LoRA, scaling 1), atomically.

    ``base_model`` is recorded by name only (a local path would not mean anything on another machine).
    """
    from safetensors.torch import save_file

    from ..io.atomic import AtomicFolder

    r = rank or max(B.shape[1] for B, _ in adapters.values())
    ranks = {n: B.shape[1] for n, (B, _) in adapters.items()}
    if base_model is not None and Path(base_model).expanduser().exists():
        base_model = Path(base_model).expanduser().resolve().name
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none",
           "target_modules": sorted({n.rsplit(".", 1)[-1] for n in adapters}), "fan_in_fan_out": conv1d,
           "base_model_name_or_path": base_model, "task_type": task_type, "inference_mode": True,
           "init_lora_weights": True, "use_rslora": False, "modules_to_save": None,
           "rank_pattern": {n: k for n, k in ranks.items() if k != r},
           "alpha_pattern": {n: k for n, k in ranks.items() if k != r}}
    with AtomicFolder(out, force=force, inputs=inputs) as tmp:
        save_file(peft_state_dict(adapters, dtype), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


def load_peft_adapter(path: str | os.PathLike) -> dict:
    """{layer name: (B, A)} from a PEFT LoRA folder written by save_peft_adapter (scaling applied to B)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    sd = load_file(str(path / "adapter_model.safetensors"))
    out = {}
    for k, A in sd.items():
        if k.endswith(".lora_A.weight"):
            n = k[len("base_model.model."):-len(".lora_A.weight")]
            B = sd[k.replace("lora_A", "lora_B")]
            r = cfg.get("rank_pattern", {}).get(n, cfg["r"])
            alpha = cfg.get("alpha_pattern", {}).get(n, cfg["lora_alpha"])
            out[n] = (B.float() * (alpha / r), A.float())
    return out


def apply_adapters(model: nn.Module, adapters: dict) -> None:
    mods = dict(model.named_modules())
    for n, (B, A) in adapters.items():
        set_weight_matrix(mods[n], weight_matrix(mods[n]) + B.float() @ A.float())


class CompensateStepConfig(PlacementFields):
    original: str = Field(..., description="the uncompressed model folder")
    method: Literal["eora", "svd"] = "eora"
    rank: int = Field(16, gt=0)
    calib: str = "wiki"
    nsamples: int = Field(32, gt=0)
    seqlen: int = Field(512, gt=1)
    seed: int = 0
    sampling: Literal["random", "consecutive"] = "random"
    format: str = Field("hf", description="hf only: merged corrections leave the integer grid")

    @field_validator("format")
    @classmethod
    def _dense_only(cls, v: str) -> str:
        if v != "hf":
            raise ValueError("merged EoRA/SVD corrections move the weights off the integer grid, so the output "
                             f"must be format hf (dense), not {v!r}")
        return v


@register("compress", "compensate", kind="transform", config=CompensateStepConfig, regime=Regime.LAYERWISE,
          paper="EoRA: Training-free Compensation for Compressed LLM with Eigenspace Low-Rank Approximation "
                "(Liu et al., 2024)",
          summary="recipe step: add merged rank-r EoRA (or plain SVD) corrections of a compressed causal LM",
          workdir=True)
def compensate_step(source, cfg: CompensateStepConfig, workdir, show_progress: bool | None = None):
    """The `weightlab compensate` job on the model the previous step wrote (sequential for causal LMs)."""
    from ..io.reader import open_checkpoint
    from ..engine.source import step_folder
    from .jobs import compensate_job, step_placement

    _, result = compensate_job(step_folder(source), workdir / "compensated", cfg.original, cfg.method, cfg.rank,
                               calib=cfg.calib, nsamples=cfg.nsamples, seqlen=cfg.seqlen, seed=cfg.seed,
                               sampling=cfg.sampling, no_eval=True, force=True, **step_placement(cfg))
    out = open_checkpoint(workdir / "compensated")
    out.report = {k: v for k, v in (result or {}).items() if k != "layers"}
    return out
