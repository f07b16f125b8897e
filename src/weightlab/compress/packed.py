"""Quantized layers as stored integers, and the packed checkpoint format (docs/quantization-format.md).

The packed format is weightlab's own (it also holds PB-LLM and StatsQ layers, which no served
format does); nothing else reads it, and its config.json is fenced so transformers refuses it.
For transformers/vLLM write compressed-tensors (compress/deploy.py).

Three layer schemes, each with an exact ``dequantize()`` (float32, (out, in)):

- ``affine`` (RTN, GPTQ): b-bit codes + per-(row, group) float16 scales + b-bit zero points
  (+ a group index per input column when act-order permuted the groups).
- ``pbllm``: a 1-bit salient bitmap, 1-bit signs, per-row float16 (mu, alpha) for the binarized
  entries, and the salient entries as 8-bit (high_bit) codes with per-row scale/zero.
- ``statsq``: b-bit codes k with value s * (k - 2^(b-1) + 1/2) / 2^(b-1), one float16 s per row.

``pack_layer`` turns a layer into named tensors (codes bit-packed into uint8, LSB first, every
row padded to whole bytes) and JSON metadata; ``unpack_layer`` inverts it exactly. The bits per
weight reported are the stored bits of all those tensors divided by the layer's weight count.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..engine.calibration import is_conv1d_hf
from ..errors import CheckpointError
from ..tensor.quant import SCALE_DTYPES, AffineQuant

FORMAT = "weightlab-quant"
VERSION = 1
META_FILE = "quantization.json"
FENCE_MODEL_TYPE = "weightlab-packed"
SUFFIXES = ("qweight", "scales", "qzeros", "g_idx", "salient", "sign", "mu", "alpha", "scale8", "zero8", "codes8", "s")


# --- bit packing ------------------------------------------------------------------------------
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n) integer codes < 2^bits -> (rows, ceil(n*bits/8)) uint8, little-endian bit order."""
    c = codes.to(torch.uint8).numpy()
    rows, n = c.shape
    b = ((c[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(rows, n * bits)
    return torch.from_numpy(np.packbits(b, axis=1, bitorder="little").copy())


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    p = packed.numpy()
    rows = p.shape[0]
    b = np.unpackbits(p, axis=1, bitorder="little", count=n * bits).reshape(rows, n, bits)
    vals = (b.astype(np.uint16) << np.arange(bits, dtype=np.uint16)).sum(-1).astype(np.uint8)
    return torch.from_numpy(vals)


# --- other schemes ----------------------------------------------------------------------------
@dataclass
class PBQuant:
    """PB-LLM layer: salient entries in high_bit bits, the rest mu + alpha * (+-1) per row."""

    salient: torch.Tensor  # (out, in) bool
    codes8: torch.Tensor  # (out, in) uint8, meaningful where salient
    scale8: torch.Tensor  # (out,) scale dtype
    zero8: torch.Tensor  # (out,) uint8
    sign: torch.Tensor  # (out, in) bool, True = +1
    mu: torch.Tensor  # (out,) scale dtype
    alpha: torch.Tensor  # (out,) scale dtype
    high_bit: int = 8

    bits = property(lambda self: 1)

    def dequantize(self) -> torch.Tensor:
        hi = self.scale8.float()[:, None] * (self.codes8.float() - self.zero8.float()[:, None])
        lo = self.mu.float()[:, None] + self.alpha.float()[:, None] * (self.sign.float() * 2 - 1)
        return torch.where(self.salient, hi, lo)


@dataclass
class StatsQuant:
    """StatsQ layer: codes k in [0, 2^b), value s * (k - n + 1/2) / n with n = 2^(b-1)."""

    codes: torch.Tensor  # (out, in) uint8
    s: torch.Tensor  # (out,) scale dtype
    bits: int

    def dequantize(self) -> torch.Tensor:
        n = 2 ** (self.bits - 1)
        return self.s.float()[:, None] * ((self.codes.float() - n + 0.5) / n)


def scheme(q) -> str:
    return {AffineQuant: "affine", PBQuant: "pbllm", StatsQuant: "statsq"}[type(q)]


def bits_per_weight(q) -> float:
    """What ``pack_layer(q)`` would store per weight, without packing (the quantize loop reports it for
    every layer; packing a large layer only to count its bytes took longer than its dequantization)."""
    if scheme(q) != "affine":
        return pack_layer(q)[1]["bits_per_weight"]
    rows, cols = q.codes.shape
    nbytes = rows * -(-cols * q.bits // 8) + q.scales.numel() * q.scales.element_size()
    nbytes += q.zeros.shape[0] * -(-q.zeros.shape[1] * q.bits // 8)
    if not q.trivial_g_idx:
        nbytes += cols * 4
    return nbytes * 8 / (rows * cols)


def pack_layer(q) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors by suffix, metadata) of one quantized layer."""
    kind = scheme(q)
    if kind == "affine":
        rows, cols = q.codes.shape
        t = {"qweight": pack_bits(q.codes, q.bits), "scales": q.scales.contiguous(),
             "qzeros": pack_bits(q.zeros, q.bits)}
        if not q.trivial_g_idx:
            t["g_idx"] = q.g_idx.to(torch.int32)
        meta = {"scheme": kind, "bits": q.bits, "group_size": q.group_size, "sym": q.sym, "shape": [rows, cols],
                "groups": q.scales.shape[1]}
    elif kind == "pbllm":
        rows, cols = q.sign.shape
        sal_codes = q.codes8[q.salient]  # row-major order of the salient entries
        t = {"salient": pack_bits(q.salient, 1), "sign": pack_bits(q.sign, 1), "mu": q.mu, "alpha": q.alpha,
             "scale8": q.scale8, "zero8": pack_bits(q.zero8[:, None], q.high_bit),
             "codes8": pack_bits(sal_codes[None, :], q.high_bit)}
        meta = {"scheme": kind, "high_bit": q.high_bit, "shape": [rows, cols], "salient_count": int(sal_codes.numel())}
    else:
        rows, cols = q.codes.shape
        t = {"qweight": pack_bits(q.codes, q.bits), "s": q.s}
        meta = {"scheme": kind, "bits": q.bits, "shape": [rows, cols]}
    meta["bits_per_weight"] = sum(v.numel() * v.element_size() * 8 for v in t.values()) / (rows * cols)
    return t, meta


def unpack_layer(t: dict[str, torch.Tensor], meta: dict):
    rows, cols = meta["shape"]
    kind = meta["scheme"]
    if kind == "affine":
        b, gs, G = meta["bits"], meta["group_size"], meta["groups"]
        g_idx = t.get("g_idx")
        if g_idx is None:
            from ..tensor.quant import group_index

            g_idx = group_index(cols, gs).to(torch.int32)
        return AffineQuant(unpack_bits(t["qweight"], b, cols), t["scales"], unpack_bits(t["qzeros"], b, G),
                           g_idx, b, gs, meta.get("sym", False))
    if kind == "pbllm":
        hb = meta["high_bit"]
        salient = unpack_bits(t["salient"], 1, cols).bool()
        codes8 = torch.zeros(rows, cols, dtype=torch.uint8)
        codes8[salient] = unpack_bits(t["codes8"], hb, meta["salient_count"])[0]
        return PBQuant(salient, codes8, t["scale8"], unpack_bits(t["zero8"], hb, 1)[:, 0],
                       unpack_bits(t["sign"], 1, cols).bool(), t["mu"], t["alpha"], hb)
    if kind == "statsq":
        return StatsQuant(unpack_bits(t["qweight"], meta["bits"], cols), t["s"], meta["bits"])
    raise CheckpointError(f"unknown quantization scheme {kind!r}")


# --- layout of a module's weight --------------------------------------------------------------
def layout_of(mod: nn.Module) -> dict:
    return {"layout": "conv1d" if is_conv1d_hf(mod) else "linear", "weight_shape": list(mod.weight.shape),
            "dtype": str(mod.weight.dtype).replace("torch.", "")}


def to_weight(w: torch.Tensor, meta: dict) -> torch.Tensor:
    """The module's weight tensor from an (out, in) float32 matrix."""
    if meta.get("layout") == "conv1d":
        w = w.T
    return w.reshape(meta["weight_shape"]).to(getattr(torch, meta["dtype"])).contiguous()


# --- folder format ----------------------------------------------------------------------------
def save_packed(out: str | os.PathLike, quantized: dict, layouts: dict[str, dict], other: dict[str, torch.Tensor],
                config: dict | None = None, template=None, provenance=None, info: dict | None = None,
                force: bool = False) -> dict:
    """Write a packed folder: ``model.safetensors`` (packed layers + every other tensor unchanged),
    ``quantization.json`` (per-layer metadata) and config.json. Returns the summary dict."""
    from ..io.writer import CheckpointWriter

    layers = {}
    q_bits = q_numel = 0
    if provenance is not None:
        provenance.card = {**provenance.card, "warnings": [
            *provenance.card.get("warnings", []),
            "weightlab's private packed format: transformers refuses it (model_type weightlab-packed) and vLLM "
            "cannot read it. Load it with weightlab.compress.packed.load_packed, or write compressed-tensors "
            "(weightlab quantize --format compressed-tensors) to serve the model."]}
    with CheckpointWriter(out, template=template, provenance=provenance, force=force) as w:
        for name, q in quantized.items():
            t, meta = pack_layer(q)
            meta.update(layouts[name])
            layers[name] = meta
            rows, cols = meta["shape"]
            q_numel += rows * cols
            q_bits += meta["bits_per_weight"] * rows * cols
            for suffix, v in t.items():
                w.add(f"{name}.{suffix}", v)
        for name, v in other.items():
            w.add(name, v)
        summary = {"format": FORMAT, "version": VERSION, "bits_per_weight": q_bits / q_numel if q_numel else None,
                   "quantized_weights": q_numel, **(info or {}), "layers": layers}
        w.add_file(META_FILE, json.dumps(summary, indent=1))
        if config is None and template is not None and (Path(template) / "config.json").is_file():
            config = json.loads((Path(template) / "config.json").read_text())
        w.add_file("config.json", json.dumps(fenced_config(config), indent=1))
    return summary


def fenced_config(config: dict | None) -> dict:
    """config.json of a packed folder, made so that transformers refuses it.

    With the model's own config, AutoModel.from_pretrained found none of the packed weights and
    silently returned a randomly initialised model. An unknown model_type makes it raise instead
    (its message names `weightlab-packed`); the real config is kept under ``original_config``.
    """
    return {"model_type": FENCE_MODEL_TYPE, "architectures": ["WeightlabPackedFormatUseWeightlabToLoad"],
            "weightlab_packed": {"format": FORMAT, "version": VERSION, "load_with": "weightlab.compress.packed."
                                 "load_packed(path) (dequantized state dict)",
                                 "for_transformers_and_vllm": "weightlab quantize --format compressed-tensors"},
            "original_config": config or {}}


def original_config(path) -> dict:
    """The model config of a packed folder (or of any folder, unfenced)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    return cfg.get("original_config", cfg) if cfg.get("model_type") == FENCE_MODEL_TYPE else cfg


def is_packed(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def load_packed(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dequantized state dict of a packed folder (exactly the dequantized HF weights)."""
    from ..io.reader import open_checkpoint

    path = Path(path)
    if not is_packed(path):
        raise CheckpointError(f"{path} is not a weightlab packed folder (no {META_FILE})")
    summary = json.loads((path / META_FILE).read_text())
    if summary.get("format") != FORMAT or summary.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: unsupported packed format {summary.get('format')} v{summary.get('version')}")
    out: dict[str, torch.Tensor] = {}
    with open_checkpoint(path) as ck:
        names = set(ck.names())
        used = set()
        for name, meta in summary["layers"].items():
            prefix = name + "."
            t = {s: ck.get(prefix + s) for s in SUFFIXES if prefix + s in names}
            used.update(prefix + s for s in t)
            out[f"{name}.weight"] = to_weight(unpack_layer(t, meta).dequantize(), meta)
        for n in sorted(names - used):
            out[n] = ck.get(n)
    return out


def quantization_summary(path) -> dict:
    return json.loads((Path(path) / META_FILE).read_text())
