"""Recognise quantized checkpoint folders (compressed-tensors, weightlab's packed format) from their files.

A packed int32 tensor holds 8 four-bit weights, so counting its elements as parameters (what a
plain safetensors listing does) is wrong by that factor. ``quantization_of`` reads only the
config, the small ``weight_shape`` tensors and the safetensors header, and returns the logical
parameter count and the stored bits per quantized weight (codes + scales + zero points + shapes).
"""
from __future__ import annotations

import json
from pathlib import Path

CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
PACKED_META = "quantization.json"  # compress/packed.py's per-layer metadata (io must not import compress)
PACKED_SUFFIXES = ("qweight", "scales", "qzeros", "g_idx", "salient", "sign", "mu", "alpha", "scale8", "zero8",
                   "codes8", "s")


def is_compressed_tensors(config: dict | None) -> bool:
    q = (config or {}).get("quantization_config") or {}
    return isinstance(q, dict) and q.get("quant_method") == "compressed-tensors"


def quantization_of(ck) -> dict | None:
    """Format facts of an open checkpoint, or None when it is a plain (dense) one."""
    root = Path(ck.path)
    root = root if root.is_dir() else root.parent
    if is_compressed_tensors(ck.config):
        return _compressed_tensors(ck)
    if (root / PACKED_META).is_file():
        return _packed(ck, json.loads((root / PACKED_META).read_text()))
    return None


def _compressed_tensors(ck) -> dict:
    qc = ck.config["quantization_config"]
    infos = {i.name: i for i in ck.infos()}
    layers = sorted(n.removesuffix(".weight_packed") for n in infos if n.endswith(".weight_packed"))
    q_numel = q_bits = 0
    for layer in layers:
        shape = [int(v) for v in ck.get(f"{layer}.weight_shape").tolist()]
        q_numel += shape[0] * shape[1]
        q_bits += sum(infos[f"{layer}.{s}"].nbytes * 8 for s in CT_SUFFIXES if f"{layer}.{s}" in infos)
    ct_names = {f"{layer}.{s}" for layer in layers for s in CT_SUFFIXES}
    other = sum(i.numel for n, i in infos.items() if n not in ct_names)
    groups = {}
    for name, g in (qc.get("config_groups") or {}).items():
        w = g.get("weights") or {}
        groups[name] = {k: w.get(k) for k in ("num_bits", "type", "symmetric", "strategy", "group_size")}
        groups[name]["format"] = g.get("format")
    return {"format": "compressed-tensors", "scheme_format": qc.get("format"),
            "status": qc.get("quantization_status"), "groups": groups, "ignore": qc.get("ignore", []),
            "quantized_layers": len(layers), "quantized_weights": q_numel,
            "bits_per_weight": q_bits / q_numel if q_numel else None, "parameters": q_numel + other}


def _packed(ck, summary: dict) -> dict:
    layers = summary.get("layers", {})
    used = {f"{layer}.{s}" for layer in layers for s in PACKED_SUFFIXES}
    other = sum(i.numel for i in ck.infos() if i.name not in used)
    q_numel = sum(m["shape"][0] * m["shape"][1] for m in layers.values())
    return {"format": "weightlab-packed", "note": "weightlab's private format; transformers and vLLM cannot load it",
            "method": summary.get("method"), "bits": summary.get("bits"), "group_size": summary.get("group_size"),
            "quantized_layers": len(layers), "quantized_weights": q_numel,
            "bits_per_weight": summary.get("bits_per_weight"), "parameters": q_numel + other}


def describe_line(q: dict) -> str:
    """One line for `weightlab info`."""
    bpw = f"{q['bits_per_weight']:.3f} bits/weight" if q.get("bits_per_weight") else "? bits/weight"
    if q["format"] == "compressed-tensors":
        gs = [f"{g['num_bits']}-bit {g['type']} {g['strategy']}"
              + (f" {g['group_size']}" if g.get("strategy") == "group" else "")
              + (" sym" if g.get("symmetric") else " asym") for g in q["groups"].values()]
        return (f"compressed-tensors {q['scheme_format']} ({'; '.join(gs)}), {q['quantized_layers']} layers, "
                f"{bpw} incl. scales")
    if q["format"] == "weightlab-packed":
        return (f"weightlab-packed {q.get('method')} {q.get('bits')}-bit, {q['quantized_layers']} layers, {bpw} "
                "incl. scales (not loadable by transformers)")
    return f"{q.get('file_type') or q['format']}, {bpw} on disk (read dequantized)"  # GGUF, GPTQ, AWQ
