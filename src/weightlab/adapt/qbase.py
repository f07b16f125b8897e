"""Adapters on a 4-bit compressed-tensors base (the QLoRA workflow): load, train, fold dense or re-quantized.

The base loads with its quantized Linears as ``io.quantized_linear.QuantLinear`` (packed codes and
scales in memory, dequantized per forward), so ``adapt.attach`` wraps them like any Linear: the frozen
weight an adapter sees is the dequantized one, and gradients reach only the adapter. ``tune`` and any
loop of one's own train it unchanged. Two folds (``fold_job``, CLI ``weightlab adapter fold``):

- dense: every QuantLinear becomes an ``nn.Linear`` holding its dequantized weight, then ``adapt.fold``
  adds the update in float32; the written tensors equal those of the same adapter folded into the
  dequantized base (``io.hf.load_causal_lm``) bit for bit, rounded once to the output dtype.
- re-quantized: ``adapt.fold`` on the packed model (``QuantLinear.set_weight_2d``: RTN on the base's
  grid and group size, unchanged groups keep their codes), written as a compressed-tensors folder with
  the base's config. GPTQ instead needs calibration data and the compress family's quantize job, which
  this family may not import: ``weightlab adapter fold --requantize gptq`` runs that job on the dense fold.

Not QLoRA itself: NF4 codes, double-quantized scales and paged optimizers are bitsandbytes' (CUDA);
this base is the int4 symmetric grid vLLM serves, at ~4.13 bits per weight with group 128.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..io.quantized_linear import (QuantLinear, ct_scheme, load_quantized_causal_lm, module_bytes,
                                   quantized_layers, unpack_codes)

REQUANTIZE = (None, "rtn", "rtn-keep-scales")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

__all__ = ["dequantize_layers", "fold_job", "load_base", "memory_report"]


def load_base(path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): a compressed-tensors folder with packed 4/8-bit Linears; ``dtype`` = compute dtype.

    Every forward allocates and frees one dense weight per layer; glibc's growing mmap threshold would keep
    those in a fragmented heap, so large allocations are pinned to mmap (returned to the OS when freed)."""
    from ..engine.memory import large_allocations_to_mmap

    large_allocations_to_mmap()
    return load_quantized_causal_lm(path, dtype)


def memory_report(model: nn.Module) -> dict:
    """Bytes the quantized Linears hold (codes + scales + shapes) against the same weights in bf16 and fp32."""
    layers = quantized_layers(model)
    numel = sum(m.in_features * m.out_features for m in layers.values())
    held = sum(module_bytes(m) for m in layers.values())
    return {"quantized_layers": len(layers), "weights": numel, "bytes": held, "bytes_bf16": 2 * numel,
            "bytes_fp32": 4 * numel, "bits_per_weight": 8 * held / numel if numel else 0.0,
            "ratio_bf16": held / (2 * numel) if numel else 0.0, "ratio_fp32": held / (4 * numel) if numel else 0.0}


def dequantize_layers(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every QuantLinear (also one wrapped by an adapter) by an ``nn.Linear`` of its dequantized
    weight, in place; ``dtype``: of the new weights (default: each layer's compute dtype)."""
    for name, q in quantized_layers(model).items():
        dt = dtype or q.compute_dtype
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        lin.weight = nn.Parameter(q.dequantize(dt), requires_grad=False)
        if q.bias is not None:
            lin.bias = nn.Parameter(q.bias.detach().to(dt), requires_grad=False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, lin)
    return model


def _check(adapter, base, out, requantize, dtype, force: bool):
    from ..io.atomic import check_not_input
    from .api import read_folder

    if requantize not in REQUANTIZE:
        raise ConfigError(f"requantize={requantize!r}: choose 'rtn' (the base's grid and group size, fresh "
                          "scales), 'rtn-keep-scales' (the base's scales; a code moves only where its weight moved "
                          "by more than half a step) or None for a dense fold (GPTQ: fold dense, then weightlab "
                          "quantize)")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if requantize is not None and dtype is not None:
        raise ConfigError("--dtype sets the dense fold's weights; a re-quantized fold keeps the base's dtypes")
    conf, _ = read_folder(adapter)
    b, args = base_scheme(base)
    o = Path(out).expanduser()
    check_not_input(o, [Path(adapter), b])
    if o.exists() and not force:
        from ..errors import OutputExistsError

        raise OutputExistsError(f"output '{out}' already exists; pass --force to replace it")
    return conf, args


def base_scheme(base) -> tuple[Path, dict]:
    """(folder, its compressed-tensors weight scheme) of a 4-bit base, refused before any work if it is not one."""
    b = Path(base).expanduser()
    if not (b / "config.json").is_file():
        raise ConfigError(f"--base '{base}' is not a model folder with a config.json")
    return b, ct_scheme(b, json.loads((b / "config.json").read_text(encoding="utf-8")))


def fold_job(adapter, base, out, *, requantize: str | None = None, dtype: str | None = None,
             force: bool = False) -> dict:
    """Fold a weightlab adapter trained on the compressed-tensors ``base`` into ``out``.

    ``requantize``: None (a dense HF folder; ``dtype`` of its weights, default the base's scale dtype)
    or "rtn" (compressed-tensors in the base's scheme; unchanged groups keep their codes). Every check
    runs before the model is loaded. Returns a small report.
    """
    from .. import adapt

    conf, args = _check(adapter, base, out, requantize, dtype, force)
    t0 = time.perf_counter()
    model, tok = load_quantized_causal_lm(base, torch.float32)  # float32: the fold's one rounding comes last
    scale_dtype = next(iter(quantized_layers(model).values())).scale_dtype
    adapt.load(model, adapter)
    rep = {"adapter": str(adapter), "base": str(base), "method": conf["method"],
           "layers": len(adapt.adapter_layers(model)), "requantize": requantize,
           "scheme": {k: args.get(k) for k in ("num_bits", "group_size", "strategy")}}
    prov = _provenance(rep, [adapter, base])
    if requantize in ("rtn", "rtn-keep-scales"):
        changed = _fold_requantized(model, keep_scales=requantize == "rtn-keep-scales")
        _write_ct(model, base, out, prov, force)
        rep.update(format="compressed-tensors", changed_groups=changed)
    else:
        out_dtype = DTYPES[dtype] if dtype else scale_dtype
        dequantize_layers(model)
        adapt.fold(model)
        _write_dense(model, base, out, out_dtype, prov, force)
        rep.update(format="hf", dtype=str(out_dtype).removeprefix("torch."))
    rep["seconds"] = round(time.perf_counter() - t0, 2)
    return rep


def _fold_requantized(model: nn.Module, keep_scales: bool = False) -> float:
    """``adapt.fold`` on the packed layers; the share of (row, group)s whose codes or scale changed."""
    from .. import adapt

    layers = {n: m.base_layer for n, m in adapt.adapter_layers(model).items() if isinstance(m.base_layer, QuantLinear)}
    for q in layers.values():
        q.keep_scales = keep_scales
    before = {n: (q.weight_packed.clone(), q.weight_scale.clone()) for n, q in layers.items()}
    adapt.fold(model)
    changed = total = 0
    for n, q in layers.items():
        codes_old = unpack_codes(before[n][0], q.bits, q.in_features)
        diff = (q.codes() != codes_old).view(q.out_features, q.groups, -1).any(-1) | (q.weight_scale != before[n][1])
        changed, total = changed + int(diff.sum()), total + diff.numel()
    return changed / total if total else 0.0


def _provenance(rep: dict, inputs):
    from ..io.provenance import Provenance

    params = {k: rep[k] for k in ("method", "requantize", "scheme")}
    return Provenance(method="adapt/fold-quantized-base", params=params, inputs=[str(i) for i in inputs],
                      card={"details": {"adapter_method": rep["method"], "folded_layers": rep["layers"],
                                        "requantize": rep["requantize"] or "none (dequantized dense)"}})


def _write_dense(model, base, out, dtype: torch.dtype, prov, force: bool) -> None:
    """The folded model under the base's dense tensor names and order, floating tensors in ``dtype``."""
    from ..io.reader import open_checkpoint
    from ..io.writer import CheckpointWriter

    sd = model.state_dict()
    with open_checkpoint(base) as ck, CheckpointWriter(out, template=base, provenance=prov, force=force,
                                                       inputs=[base]) as w:
        for n in ck.names():
            t = sd[n] if n in sd else ck.get(n)
            w.add(n, t.to(dtype) if t.is_floating_point() else t)


def _write_ct(model, base, out, prov, force: bool) -> None:
    """A re-quantized model under the base's stored (packed) names and dtypes, with the base's config.json
    (same scheme, same ignore list: its quantization_config still describes every tensor)."""
    from ..io.reader import open_checkpoint
    from ..io.writer import CheckpointWriter

    sd = model.state_dict()
    with open_checkpoint(base, decode=False) as ck, CheckpointWriter(out, template=base, provenance=prov,
                                                                      force=force, inputs=[base]) as w:
        for n in ck.names():
            info = ck.info(n)
            t = sd[n] if n in sd else ck.get(n)
            w.add(n, t.to(info.dtype) if t.is_floating_point() else t)


def is_quantized_model(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())
