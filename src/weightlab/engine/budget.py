"""Peak-memory estimate of one layer-by-layer step, checked against ``--max-memory`` before any work.

The terms follow shared/design/scale.md §1.7 (b = bytes of the forward dtype):
W block weights, S statistics (d_in x d_in fp32 per Hessian layer, d_in otherwise), C the
activation cache (samples x seqlen x hidden x b), F one block's forward on one batch, G the
solver's working set (the handed-over Hessian, its in-place factorization, copies of the weight;
see block_estimate), S and F/G taken at whichever phase peaks. Host peak on the CPU =
resident + W + S + C + F + G; with an accelerator the
device holds W + S + F + G (+ C unless activations are offloaded) and the host the resident
modules, the staging copy of a block (+ C when offloaded). None of the terms grows with depth.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..io.writer import parse_size
from .calibration import prunable_layers, weight_view


def parse_budget(spec: str | None) -> dict[str, int]:
    """'8GB' -> {'cpu': 8e9}; 'cpu=8GB,cuda:0=20GiB' -> per device. Decimal GB as Hugging Face does."""
    if not spec:
        return {}
    out = {}
    for part in str(spec).split(","):
        dev, sep, size = part.strip().rpartition("=")
        dev = dev.strip().lower() if sep else "cpu"
        if dev == "cuda":
            dev = "cuda:0"
        try:
            out[dev] = parse_size(size)
        except ValueError:
            raise ConfigError(f"--max-memory: cannot parse {part.strip()!r}; "
                              "use e.g. 8GB, 500MiB or cpu=8GB,cuda:0=20GB") from None
    return out


def fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def block_estimate(block: torch.nn.Module, *, hidden: int, dtype: torch.dtype, batch_tokens: int,
                   cache_tokens: int, hessian: bool, solver_bytes: int = 8) -> dict[str, int]:
    """Bytes of each term for one block (works on a meta block: only shapes are read).

    Two phases peak: the calibration forward (every layer's statistics + one batch's activations) and
    each layer's solve in block order, when the statistics of the layers already done are freed, the
    solved layer's Hessian has been handed over to the solver (factored in place in float32; a float64
    copy beside it otherwise) and the solver holds copies of the weight (float32 working copy, solver
    dtype scratch, codes, the dequantized result). "statistics" and "solver" below are the terms of
    whichever phase is larger.
    """
    b = torch.empty((), dtype=dtype).element_size()
    s = solver_bytes
    W = sum(t.numel() for t in block.state_dict().values()) * b
    shapes = [tuple(weight_view(m).shape) for m in prunable_layers(block).values()]
    stats = [(i * i * 4 if hessian else 0) + i * 4 for _, i in shapes]
    widest = max((max(o, i) for o, i in shapes), default=hidden)
    F = batch_tokens * (3 * widest + 4 * hidden) * b + batch_tokens * widest * 4
    calib = sum(stats) + F
    best = (calib, sum(stats), F)
    for k, (o, i) in enumerate(shapes):
        hess = (i * i * 4 + (i * i * 8 if s == 8 else 0) + i * i * s) if hessian else 0
        solve = hess + o * i * ((4 + s + 2 + 8) if hessian else 28)  # non-Hessian rules: sort keys and indices
        later = sum(stats[k + 1:])
        if later + solve > best[0]:
            best = (later + solve, later, solve)
    C = cache_tokens * hidden * b
    return {"weights": W, "statistics": best[1], "forward": F if best[0] == calib else 0,
            "solver": 0 if best[0] == calib else best[2], "cache": C}


def check_budget(onload, *, nsamples: int, seqlen: int, batch_size: int, hessian: bool,
                 budget: dict[str, int], offload_activations: bool, solver_bytes: int = 8) -> dict:
    """Estimate the peak of the sequential run; ConfigError naming the block and bytes if it cannot fit."""
    cfg = onload.config.get_text_config() if hasattr(onload.config, "get_text_config") else onload.config
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    dev = onload.device
    per_block = []
    for i, blk in enumerate(onload.blocks):
        per_block.append(block_estimate(blk, hidden=hidden, dtype=onload.dtype, batch_tokens=batch_size * seqlen,
                                        cache_tokens=nsamples * seqlen, hessian=hessian,
                                        solver_bytes=solver_bytes))
    worst = max(range(len(per_block)), key=lambda i: sum(per_block[i].values()))
    e = per_block[worst]
    resident = onload.resident_bytes()
    on_dev = e["weights"] + e["statistics"] + e["forward"] + e["solver"]
    if dev.type == "cpu":
        host = resident + on_dev + e["cache"]
        device_peak = None
    else:
        device_peak = on_dev + (0 if offload_activations else e["cache"])
        host = resident + e["weights"] + (e["cache"] if offload_activations else 0)
    name = onload.block_prefix(worst)
    parts = ", ".join(f"{k} {fmt(v)}" for k, v in e.items())
    want_host = budget.get("cpu")
    if want_host is not None and host > want_host:
        raise ConfigError(f"block {name} needs about {fmt(host)} of host memory ({parts}; resident modules "
                          f"{fmt(resident)}), more than --max-memory {fmt(want_host)}; lower --nsamples/--seqlen"
                          + ("" if dev.type == "cpu" else " or add --offload-activations"))
    if device_peak is not None:
        key = f"{dev.type}:{dev.index or 0}" if dev.type == "cuda" else dev.type
        limit = budget.get(key)
        if limit is None and dev.type == "cuda":
            limit = torch.cuda.get_device_properties(dev).total_memory
        if limit is not None and device_peak > limit:
            hint = " or add --offload-activations" if not offload_activations else ""
            raise ConfigError(f"block {name} needs about {fmt(device_peak)} on {dev} ({parts}), more than its "
                              f"{fmt(limit)}; lower --nsamples/--seqlen{hint}")
    return {"block": name, "host_bytes": host, "device_bytes": device_peak, "terms": e, "resident": resident}
