"""Safetensors dtype names <-> torch dtypes."""
from __future__ import annotations

import torch

ST_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        ST_TO_TORCH[_name] = getattr(torch, _attr)

TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}

ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in ST_TO_TORCH.items()}

_ALIASES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bf16', 'bfloat16', 'torch.bfloat16', 'BF16' -> torch.bfloat16."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).strip()
    key = key.removeprefix("torch.")
    if key in ST_TO_TORCH:
        return ST_TO_TORCH[key]
    if key.lower() in _ALIASES:
        return _ALIASES[key.lower()]
    raise ValueError(f"unknown dtype '{name}'; use one of float32, float16, bfloat16, float64")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
