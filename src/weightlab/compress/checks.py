"""What the compress jobs check before any work: the options (without the model), then the input's values."""
from __future__ import annotations

from ..errors import ConfigError


def check_prune_request(method: str, sparsity: float | None, pattern: str | None, allocation: str,
                        params: dict) -> float:
    """Every prune option checked before anything is loaded; returns the sparsity to use (N/M for a pattern)."""
    from ..registry import get_method
    from ..tensor.pruning import parse_pattern

    spec = get_method("compress", method)
    if spec.kind != "prune":
        raise ConfigError(f"compress/{spec.name} is not a pruning rule (weightlab methods --family compress)")
    spec.make_config(params)
    alloc = get_method("compress", allocation)
    if alloc.kind != "allocate":
        raise ConfigError(f"'{allocation}' is not an allocation; use uniform, global, lamp, dimap or rd")
    try:
        nm = parse_pattern(pattern)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if nm is not None:
        implied = nm[0] / nm[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise ConfigError(f"pattern {pattern} prunes {nm[0]} of every {nm[1]} weights (sparsity {implied:g}); "
                              f"sparsity {sparsity:g} would be ignored - drop it")
        if allocation != "uniform":
            raise ConfigError("an N:M pattern fixes the sparsity of every layer; use allocation uniform")
        sparsity = implied
    sparsity = 0.5 if sparsity is None else sparsity
    if not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    return sparsity


def check_quant_request(method: str, bits: int | None, group_size: int, params: dict) -> int:
    """Every quantize option checked before anything is loaded; returns the bits to use."""
    from ..registry import get_method

    spec = get_method("compress", method)
    if spec.kind != "quantize":
        raise ConfigError(f"compress/{spec.name} is not a quantizer (weightlab methods --family compress)")
    spec.make_config(params)
    bits = spec.contract.default_bits if bits is None else bits
    lo, hi = spec.contract.bits_range
    if not isinstance(bits, int) or not lo <= bits <= hi:
        raise ConfigError(f"{spec.name}: bits must be an integer in [{lo}, {hi}], got {bits!r}")
    if group_size == 0 or group_size < -1:
        raise ConfigError(f"group size must be a positive number of columns or -1 (per channel), got {group_size}")
    return bits


def check_finite(ck, src) -> None:
    """NaN/Inf anywhere in the input is one error before any compute or output, naming the tensors."""
    import torch

    from ..errors import TensorValueError

    bad = []
    for name in ck.names():
        if ck.info(name).dtype.is_floating_point and not bool(torch.isfinite(ck.get(name)).all()):
            bad.append(name)
    if bad:
        raise TensorValueError(f"{src}: NaN/Inf in {len(bad)} tensor(s): {', '.join(bad[:8])}"
                               + (" ..." if len(bad) > 8 else "") + "; fix the checkpoint first")
