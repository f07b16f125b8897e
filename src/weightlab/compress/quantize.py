"""`quantize(model, method, bits, group_size)`: one verb for every weight quantizer.

Data-free quantizers (RTN, StatsQ) walk the layers directly; Hessian-based ones (GPTQ, PB-LLM)
run in the layer-by-layer calibration engine, so each block is quantized on inputs that
already went through the quantized earlier blocks. The model is changed in place: every
target layer's weight becomes its dequantized value (a "fake-quantized" dense model any
transformers user can load). The integer form of every layer is kept in the report
(``report.quantized``) for the packed format (compress/packed.py).

A quantizer is registered as ``register("compress", name, kind="quantize", ...)`` with a
function ``fn(ctx: QuantContext) -> AffineQuant | PBQuant | StatsQuant``. A quantizer whose ``needs``
include "block" also registers a block step (``@block_step(name)``, ``fn(ctx: BlockContext)``) that
the engine runs on each block before its layers are quantized, with the block and its cached inputs
(AWQ's smoothing, compress/awq.py).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..engine.result import Result
from ..engine.calibration import LayerStats, set_weight_matrix, weight_matrix
from ..errors import ConfigError
from ..registry import Regime, get_method, register
from .driver import for_each_layer
from .packed import bits_per_weight, layout_of
from .prune import _blocks_of, target_layers, to_batches
from .sequential import PlacementFields

QUANT_KIND = "quantize"


@dataclass
class QuantContext:
    name: str
    module: nn.Module
    weight: torch.Tensor  # (out, in) float32
    bits: int
    group_size: int
    sym: bool
    scale_dtype: str
    cfg: object
    stats: LayerStats | None = None
    extra: dict = field(default_factory=dict)
    keep: torch.Tensor | None = None  # (out, in) bool: weights that must stay exactly 0 (a pruned model's zeros)


@dataclass
class QuantReport(Result):
    method: str
    bits: int
    group_size: int
    layers: list[dict] = field(default_factory=list)
    quantized: dict = field(default_factory=dict)  # layer name -> AffineQuant | PBQuant | StatsQuant
    layouts: dict = field(default_factory=dict)
    seconds: float = 0.0
    transforms: list = field(default_factory=list)  # what block steps did (AWQ: one entry per smoothed mapping)
    act: object = None  # activations.ActScheme when activations or the KV cache are quantized (W8A8, FP8)

    @property
    def bits_per_weight(self) -> float:
        n = sum(r["numel"] for r in self.layers)
        return sum(r["bits_per_weight"] * r["numel"] for r in self.layers) / n if n else 0.0

    def as_dict(self) -> dict:
        n = sum(r["numel"] for r in self.layers)
        err = sum(r["rel_error"] ** 2 * r["sq_norm"] for r in self.layers)
        tot = sum(r["sq_norm"] for r in self.layers)
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size,
                "bits_per_weight": round(self.bits_per_weight, 4), "quantized_weights": n,
                "rel_weight_error": round((err / tot) ** 0.5, 6) if tot else 0.0,
                "seconds": round(self.seconds, 2), "layers": self.layers,
                **({"transforms": self.transforms} if self.transforms else {}),
                **({"activations": dataclasses.asdict(self.act)} if self.act is not None else {})}


@dataclass
class BlockContext:
    """What a block step sees: the block and its inputs (``run``), the block's target layers and their
    input statistics (a step that changes a layer's inputs updates them: ``LayerStats.scale_inputs_``),
    the grid settings, the quantizer's config, and ``record`` (the report's ``transforms`` list)."""

    run: object  # engine.calibration.BlockRun
    layers: dict
    stats: dict
    bits: int
    group_size: int
    sym: bool
    scale_dtype: str
    cfg: object
    record: list


BLOCK_STEPS: dict = {}


def block_step(name: str):
    """Register ``fn(ctx: BlockContext)`` as the block step of quantizer ``name`` (its ``needs`` has "block")."""
    def deco(fn):
        BLOCK_STEPS[name] = fn
        return fn
    return deco


def quant_needs(spec, cfg) -> set:
    needs = spec.contract.needs
    return set(needs(cfg) if callable(needs) else needs)


def quantizers() -> list:
    from ..registry import list_methods

    return [s for s in list_methods("compress") if s.kind == "quantize"]


def quantize(model: nn.Module, method: str = "rtn", bits: int | None = None, group_size: int = 128, *,
             sym: bool = False, scale_dtype: str = "float16", calib=None, tokenizer=None, nsamples: int = 32,
             seqlen: int = 512, seed: int = 0, sampling: str = "random", show_progress: bool | None = None,
             layer_filter=None, device: str | torch.device | None = None, after_block=None, dist=None,
             shards: int = 1, offload_activations: bool = False, quantized_sink: dict | None = None,
             keep_zeros: bool = True, activations: str = "none", observer: str = "static_minmax",
             kv_cache: bool = False, **method_params) -> QuantReport:
    """Quantize ``model`` in place (weights := dequantized values); return the report with integer layers.

    ``group_size <= 0`` means one group per output row (per-channel); a partial last group is allowed.
    ``bits`` defaults to the method's own default (PB-LLM: the salient high-bit width is its own parameter).
    ``model`` may be an ``OnloadedModel`` (sequential onloading); ``device``, ``after_block``, ``dist``,
    ``shards`` and ``offload_activations`` are engine.calibration.layerwise's. ``quantized_sink``: a dict
    that receives the integer layers instead of ``report.quantized`` (sequential writers consume and
    drop them block by block, so the codes of the whole model are never held at once).
    ``keep_zeros``: a weight that is exactly 0 before quantization (a pruned model) is exactly 0
    after it - the zero level is on every affine grid, and GPTQ compensates the error of keeping
    it. Quantizers without a zero level (StatsQ, PB-LLM) refuse a pruned layer unless this is off.
    ``activations``: none (weight-only), ``dynamic`` (8-bit per-token input scales at run time) or ``static``
    (one input scale per layer, max |x| over the calibration inputs by ``observer``; kept in each integer layer's
    ``input_absmax``); int8 with integer weights, FP8 with fp8's. ``kv_cache``: FP8 keys/values with calibrated
    per-tensor scales (report.quantized gets an activations.KVRange per attention module). compress/activations.py.
    """
    t0 = time.perf_counter()
    onload = model if hasattr(model, "load_block") else None
    model = onload.model if onload is not None else model
    spec = get_method("compress", method)
    if spec.kind != "quantize":
        raise ConfigError(f"compress/{spec.name} is not a quantizer; quantizers: "
                          + ", ".join(s.name for s in quantizers()))
    cfg = spec.make_config(method_params)
    bits = spec.contract.default_bits if bits is None else bits
    lo, hi = spec.contract.bits_range
    if not isinstance(bits, int) or not lo <= bits <= hi:
        raise ConfigError(f"{spec.name}: bits must be an integer in [{lo}, {hi}], got {bits!r}")
    if scale_dtype not in ("float16", "float32", "bfloat16"):
        raise ConfigError(f"scale_dtype must be float16, float32 or bfloat16, got {scale_dtype!r}")
    act = _act_scheme(spec.name, bits, activations, observer, kv_cache)
    layers = target_layers(model, _blocks_of(onload))
    if layer_filter is not None:
        layers = {n: m for n, m in layers.items() if layer_filter(n)}
    if not layers:
        raise ConfigError("the model has no Linear/Conv layers to quantize")
    needs = quant_needs(spec, cfg)
    report = QuantReport(spec.name, bits, group_size, act=act if act.active else None)
    sink = report.quantized if quantized_sink is None else quantized_sink
    observed: dict = {"inputs": {}, "kv": {}}  # this block's calibrated activation ranges
    step = None
    if "block" in needs or act.calibrates:
        fn = BLOCK_STEPS.get(spec.name) if "block" in needs else None

        def step(run, ls, st):
            if fn is not None:
                fn(BlockContext(run, ls, st, bits, group_size, sym, scale_dtype, cfg, report.transforms))
            if act.calibrates:  # after the block's transform, on the inputs the quantized layers will see
                from .activations import observe_block

                observed["inputs"], observed["kv"] = observe_block(run, ls, act)
    # a quantizer may want the next block's inputs computed with its transformed but unquantized weights
    # (AWQ/SmoothQuant with RTN, as llm-compressor): the quantized weights are then set once the block has run
    # again; so do data-free quantizers whose activation scales are
    # calibrated: llm-compressor calibrates them with its quantization disabled, on the full-precision model
    late = [] if not getattr(cfg, "propagate_quantized", "hessian" in needs or not act.calibrates) else None

    def do_layers(names_mods, stats):
        for n, m in names_mods.items():
            w = weight_matrix(m)
            keep = _zeros_to_keep(n, w, spec) if keep_zeros else None
            # pop: each layer's d_in x d_in statistics are freed once it is done, not at the end of the block
            ctx = QuantContext(n, m, w, bits, group_size, sym, scale_dtype, cfg, stats.pop(n, None) if stats else None,
                               keep=keep)
            q = spec.fn(ctx)
            if keep is not None:
                q = _force_zeros(q, keep)
            if act.inputs == "static":
                q.input_absmax = observed["inputs"].get(n)
                if q.input_absmax is None:
                    raise ConfigError(f"no calibration input reached {n}, so it has no static input scale")
            w_hat = q.dequantize()
            if late is not None:
                late.append((m, w_hat))
            else:
                set_weight_matrix(m, w_hat)
            bpw = _bits_per_weight(q)
            sq = _sq_sum(w)
            sink[n] = _to_cpu(q)
            report.layouts[n] = layout_of(m)
            report.layers.append({"name": n, "shape": list(w.shape), "numel": w.numel(),
                                  "bits_per_weight": round(bpw, 4), "sq_norm": sq,
                                  "rel_error": (_sq_sum(w, w_hat) / max(sq, 1e-30)) ** 0.5,
                                  "kept_zeros": int(keep.sum()) if keep is not None else 0})
        sink.update(observed["kv"])  # KVRange per attention module of the block
        observed["kv"] = {}

    def set_late(i, name, block):
        while late:
            m, w_hat = late.pop()
            set_weight_matrix(m, w_hat)
        if after_block is not None:
            after_block(i, name, block)

    data = "hessian" in needs or step is not None
    for_each_layer(model, layers, do_layers, stats=data, hessian="hessian" in needs,
                   batches=to_batches(calib, tokenizer, nsamples, seqlen, seed, sampling) if data else None,
                   label=f"quantize/{spec.name}", device=device, onload=onload,
                   after_block=set_late if late is not None else after_block, dist=dist, shards=shards,
                   offload_activations=offload_activations, show_progress=show_progress, block_step=step,
                   layer_stats="hessian" in needs)  # quantizers read no other statistics
    report.seconds = time.perf_counter() - t0
    return report


def _bits_per_weight(q) -> float:
    from ..tensor.quant8 import FloatQuant

    if isinstance(q, FloatQuant):  # one byte a weight plus its scales (the packed format has no FP8 layout)
        return (q.codes.numel() + q.scales.numel() * q.scales.element_size()) * 8 / q.codes.numel()
    return bits_per_weight(q)


def _act_scheme(method: str, bits: int, activations: str, observer: str, kv_cache: bool):
    from .activations import ActScheme

    act = ActScheme(activations, observer, "float" if method == "fp8" else "int", bool(kv_cache))
    if act.inputs != "none" and bits != 8:
        raise ConfigError(f"quantized activations are 8-bit (W8A8 int8 or FP8) and take 8-bit weights; got "
                          f"{bits}-bit weights: pass --bits 8, or --activations none (weight-only)")
    return act


def _zeros_to_keep(name: str, w: torch.Tensor, spec) -> torch.Tensor | None:
    keep = w == 0
    n = int(keep.sum())
    if n == 0:
        return None
    if not spec.contract.zero_level:
        from .cards import MIN_SPARSITY

        if n / w.numel() >= MIN_SPARSITY:
            raise ConfigError(f"layer '{name}' is pruned ({n / w.numel():.0%} exact zeros) and {spec.name}'s grid "
                              "has no zero level, so quantizing would undo the pruning; use rtn or gptq, or pass "
                              "keep_zeros=False (CLI: --no-keep-zeros) to quantize it anyway")
        return None
    return keep


def _force_zeros(q, keep: torch.Tensor):
    """Codes of the kept zeros := their group's zero point (exactly 0 after dequantization)."""
    from ..tensor.quant import AffineQuant

    if isinstance(q, AffineQuant):  # only at the kept positions (a few), not a (out x in) gather of zero points
        r, c = keep.nonzero(as_tuple=True)
        q.codes = q.codes.index_put((r, c), q.zeros[r, q.g_idx.long()[c]].to(q.codes.dtype))
    return q


def _sq_sum(a: torch.Tensor, b: torch.Tensor | None = None, rows: int = 256) -> float:
    """sum((a - b)^2) in float64, a few rows at a time (float64 copies of a large layer cost 16 bytes a weight)."""
    return sum(float(((x if b is None else x - b[r:r + rows]).double() ** 2).sum())
               for r, x in zip(range(0, a.shape[0], rows), a.split(rows)))


def _to_cpu(q):
    """The integer layer with its tensors on the CPU (codes of earlier blocks must not pile up on a device)."""
    import dataclasses

    if not dataclasses.is_dataclass(q):
        return q
    return dataclasses.replace(q, **{f.name: getattr(q, f.name).cpu() for f in dataclasses.fields(q)
                                     if isinstance(getattr(q, f.name), torch.Tensor)})


def dequantized_state_dict(model: nn.Module, ck) -> dict:
    """Every tensor of the checkpoint ``ck``, with the model's (quantized) values in the checkpoint dtypes."""
    sd = model.state_dict()
    return {n: sd[n].to(ck.info(n).dtype) if n in sd else ck.get(n) for n in ck.names()}


def save_quantized_packed(out, report: QuantReport, model: nn.Module, ck, provenance=None, force: bool = False,
                          info: dict | None = None) -> dict:
    """Write the packed folder for a quantized model: packed layers + all other checkpoint tensors."""
    from .packed import save_packed

    sd = dequantized_state_dict(model, ck)
    other = {n: t for n, t in sd.items()
             if n.removesuffix(".weight") not in report.quantized or not n.endswith(".weight")}
    layouts = {n: {**lay, "dtype": str(ck.info(f"{n}.weight").dtype).replace("torch.", "")}
               for n, lay in report.layouts.items()}
    return save_packed(out, report.quantized, layouts, other, config=ck.config, template=ck.path,
                       provenance=provenance, force=force,
                       info={"method": report.method, "bits": report.bits, "group_size": report.group_size,
                             **(info or {})})


class QuantizeStepConfig(PlacementFields):
    method: str = "gptq"
    bits: int | None = None
    group_size: int = 128
    sym: bool | None = Field(None, description="symmetric grid; default: true for compressed-tensors, false for hf")
    calib: str = "wiki"
    nsamples: int = Field(32, gt=0)
    seqlen: int = Field(512, gt=1)
    seed: int = 0
    sampling: Literal["random", "consecutive"] = "random"
    format: Literal["hf", "compressed-tensors"] = Field(
        "hf", description="hf: dequantized weights; compressed-tensors: packed 4/8-bit (must be the last step)")
    keep_zeros: bool = Field(True, description="weights that are exactly 0 (a pruned model) stay exactly 0")
    params: dict = Field(default_factory=dict, description="the quantizer's own parameters")


@register("compress", "quantize", kind="transform", config=QuantizeStepConfig, regime=Regime.LAYERWISE,
          paper="(recipe step running a quantizer; see the quantizers' papers)",
          summary="recipe step: quantize a causal LM checkpoint (RTN, GPTQ, AWQ, PB-LLM, StatsQ); writes dequantized "
                  "weights or compressed-tensors", workdir=True)
def quantize_step(source, cfg: QuantizeStepConfig, workdir, show_progress: bool | None = None):
    """The `weightlab quantize` job on the model the previous step wrote (sequential for causal LMs)."""
    from ..io.reader import open_checkpoint
    from ..engine.source import step_folder
    from .jobs import quantize_job, step_placement

    _, result = quantize_job(step_folder(source), workdir / "quantized", cfg.method, cfg.bits, cfg.group_size,
                             sym=cfg.sym, keep_zeros=cfg.keep_zeros, calib=cfg.calib, nsamples=cfg.nsamples,
                             seqlen=cfg.seqlen, seed=cfg.seed, sampling=cfg.sampling, no_eval=True, fmt=cfg.format,
                             params=cfg.params, force=True, **step_placement(cfg))
    out = open_checkpoint(workdir / "quantized")
    out.report = {k: v for k, v in (result or {}).items() if k != "layers"}
    return out
