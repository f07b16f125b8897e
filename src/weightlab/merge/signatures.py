"""Robust Weight Signatures (Cai et al., "Robust Weight Signature: Gaining Robustness as Easy as
Patching Weights?", ICML 2023).

A signature is what robust fine-tuning added beyond clean fine-tuning, in the shallow
layers: per layer l, with a = clean - base and g = robust - base (weights and bias of the
layer flattened together), RWS_l = g - (<g, a> / <a, a>) a. It is stored compactly
(optionally quantized), added to a clean model with a strength alpha, composed with
others (C signatures with one alpha use alpha / C each) and removed by subtracting it.
Arithmetic is float64 and the result is rounded once to the model's dtype, so removing a
signature restores the model to within that one rounding (1e-12 in float64, an ulp in float32).
"""
from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from ..errors import ConfigError
from ..io.reader import open_checkpoint
from ..registry import MethodConfig, Regime, register

StateDict = dict[str, torch.Tensor]


def layer_groups(names: list[str], shapes: dict[str, tuple]) -> list[list[str]]:
    """Tensors grouped by module (name prefix) in checkpoint order; only modules with a >=2-D weight."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n.rsplit(".", 1)[0], []).append(n)
    return [g for g in groups.values() if any(len(shapes[n]) >= 2 for n in g)]


def select_layers(names: list[str], shapes: dict[str, tuple], layers: int | None = None,
                  patterns: list[str] | None = None, floating: set[str] | None = None) -> list[list[str]]:
    groups = layer_groups(names, shapes)
    if floating is not None:
        groups = [[n for n in g if n in floating] for g in groups]
    if patterns:
        groups = [g for g in groups if any(fnmatch.fnmatchcase(n, p) for n in g for p in patterns)]
    if layers is not None:
        groups = groups[:layers]
    if not groups:
        raise ConfigError("no layers selected for the signature; check --layers / --pattern")
    return groups


class SignatureConfig(MethodConfig):
    layers: int | None = 7  # the paper patches the first 7 of VGG-16's 13 convolutions
    patterns: list[str] | None = None


@register("merge", "robust-weight-signature", kind="merge-model", config=SignatureConfig, regime=Regime.STREAMING,
          aliases=("rws", "signature"),
          paper="Robust Weight Signature: Gaining Robustness as Easy as Patching Weights? (Cai et al., 2023)",
          summary="extract / apply / compose / remove the shallow-layer robustness update (weightlab signature)")
def extract(base: StateDict, clean: StateDict, robust: StateDict, layers: int | None = 7,
            patterns: list[str] | None = None) -> StateDict:
    """The signature of ``robust`` relative to ``clean`` (both fine-tuned from ``base``), first ``layers`` layers."""
    names = list(clean)
    for sd, what in ((base, "base"), (robust, "robust")):
        missing = [n for n in names if n not in sd]
        if missing:
            raise ConfigError(f"the {what} model lacks tensors of the clean model: {missing[:5]}")
    shapes = {n: tuple(clean[n].shape) for n in names}
    floating = {n for n in names if clean[n].is_floating_point()}
    sig: StateDict = {}
    for group in select_layers(names, shapes, layers, patterns, floating):
        a = torch.cat([(clean[n].double() - base[n].double()).reshape(-1) for n in group])
        g = torch.cat([(robust[n].double() - base[n].double()).reshape(-1) for n in group])
        aa = torch.dot(a, a)
        r = g - (torch.dot(g, a) / aa) * a if aa > 0 else g
        off = 0
        for n in group:
            k = clean[n].numel()
            sig[n] = r[off:off + k].view(clean[n].shape).float()
            off += k
    return sig


def quantize(x: torch.Tensor, levels: int = 256, mode: Literal["linear", "log"] = "linear"):
    """Codes and the facts to decode them. Linear: `levels` values over [min, max], error <= (max-min)/(2(levels-1))."""
    if levels < 2:
        raise ConfigError("quantization needs at least 2 levels")
    x = x.double()
    if mode == "linear":
        lo, hi = float(x.min()), float(x.max())
        step = (hi - lo) / (levels - 1) if hi > lo else 1.0
        codes = torch.round((x - lo) / step).to(torch.int32)
        return codes.to(torch.uint8 if levels <= 256 else torch.int32), {"mode": "linear", "lo": lo, "step": step}
    nz = x != 0
    mags = torch.log2(x.abs()[nz]) if bool(nz.any()) else torch.zeros(1, dtype=x.dtype)
    half = max(1, levels // 2)
    lo, hi = float(mags.min()), float(mags.max())
    step = (hi - lo) / (half - 1) if hi > lo and half > 1 else 1.0
    codes = torch.zeros_like(x, dtype=torch.int32)
    codes[nz] = (torch.round((torch.log2(x.abs()[nz]) - lo) / step).to(torch.int32) + 1) * torch.sign(x[nz]).to(torch.int32)
    return codes.to(torch.int16), {"mode": "log", "lo": lo, "step": step}


def dequantize(codes: torch.Tensor, meta: dict) -> torch.Tensor:
    c = codes.to(torch.float64)
    if meta["mode"] == "linear":
        return (meta["lo"] + c * meta["step"]).float()
    mag = torch.exp2(meta["lo"] + (c.abs() - 1) * meta["step"])
    return torch.where(c == 0, torch.zeros_like(c), torch.sign(c) * mag).float()


def save(sig: StateDict, path: str | os.PathLike, levels: int | None = None, mode: str = "linear",
         metadata: dict | None = None) -> Path:
    """Write a signature as one .safetensors file (quantized codes when ``levels`` is given); atomic."""
    path = Path(path)
    tensors, qmeta = {}, {}
    for n, t in sig.items():
        if levels:
            codes, m = quantize(t, levels, mode)
            tensors[n] = codes.contiguous()
            qmeta[n] = m
        else:
            tensors[n] = t.contiguous()
    meta = {"weightlab.kind": "robust-weight-signature", "weightlab.quant": json.dumps(qmeta),
            **{k: str(v) for k, v in (metadata or {}).items()}}
    from ..io.atomic import write_file_atomic

    return write_file_atomic(path, writer=lambda tmp: save_file(tensors, tmp, metadata=meta))


def load(path: str | os.PathLike) -> StateDict:
    ck = open_checkpoint(path)
    if ck.metadata.get("weightlab.kind") != "robust-weight-signature":
        raise ConfigError(f"'{path}' is not a weightlab signature file (made by `weightlab signature extract`)")
    qmeta = json.loads(ck.metadata.get("weightlab.quant", "{}"))
    return {n: dequantize(ck.get(n), qmeta[n]) if n in qmeta else ck.get(n).float() for n in ck.names()}


def apply(model: StateDict, signatures: list[StateDict], alpha: float | list[float] = 1.0) -> StateDict:
    """model + sum_c w_c RWS_c; one alpha for C signatures gives w_c = alpha / C; a list gives each its own."""
    ws = alpha if isinstance(alpha, list) else [alpha / len(signatures)] * len(signatures)
    if len(ws) != len(signatures):
        raise ConfigError(f"{len(ws)} strengths for {len(signatures)} signatures")
    out = dict(model)
    for sig, w in zip(signatures, ws):
        for n, s in sig.items():
            if n not in model:
                raise ConfigError(f"the signature has tensor '{n}', which the model lacks")
            if tuple(s.shape) != tuple(model[n].shape):
                raise ConfigError(f"signature tensor '{n}' has shape {list(s.shape)}, model {list(model[n].shape)}")
    for n in {n for sig in signatures for n in sig}:
        acc = model[n].double()
        for sig, w in zip(signatures, ws):
            if n in sig:
                acc = acc + w * sig[n].double()
        out[n] = acc.to(model[n].dtype)
    return out


def remove(model: StateDict, signatures: list[StateDict], alpha: float | list[float] = 1.0) -> StateDict:
    ws = alpha if isinstance(alpha, list) else [alpha / len(signatures)] * len(signatures)
    return apply(model, signatures, [-w for w in ws])


def quant_error_bound(x: torch.Tensor, levels: int) -> float:
    return (float(x.max()) - float(x.min())) / (2 * (levels - 1)) if x.numel() else 0.0


__all__ = ["apply", "dequantize", "extract", "layer_groups", "load", "quant_error_bound", "quantize", "remove",
           "save"]
