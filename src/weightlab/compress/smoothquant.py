"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", ICML 2023) as llm-compressor's SmoothQuantModifier (0.14) does it, in weightlab's layer-by-layer engine.

A block step (quantize.BlockContext) followed by an ordinary quantizer, like AWQ (compress/awq.py). For each
block, for each mapping smooth -> balance layers (llm-compressor's default mappings, by module name:
input_layernorm -> q/k/v_proj, post_attention_layernorm -> gate/up_proj):

1. One pass of the unsmoothed block over its cached inputs records, per output channel j of the smooth
   layer (= input channel of the balance layers), the minimum and maximum over all calibration tokens.
2. a_j = max_j - min_j (the channel's dynamic range), w_j = 2 max over the rows of all balance layers of
   |W[:, j]|, and s_j = a_j^alpha / w_j^(1 - alpha) (a_j where w_j = 0), clamped at 1e-5; alpha = 0.5.
   This is the paper's max|X_j|^alpha / max|W_j|^(1-alpha) with ranges in place of maxima, as llm-compressor
   computes it (equal to the paper's for ranges symmetric around 0 at alpha 0.5).
3. The fold: balance columns W[:, j] * s_j, the smooth layer's output divided by s (a norm's weight and
   bias, or a Linear's rows and bias). The block computes the same function (tested to fp32 rounding); the
   activations the balance layers see are x_j / s_j, whose outlier channels are flattened, and the balance
   layers' input statistics follow (LayerStats.scale_inputs_: a GPTQ follow-up sees S^-1 H S^-1).

Then every target layer of the block is quantized by ``quantizer``: rtn (llm-compressor's SmoothQuant +
QuantizationModifier W8A8 recipe; the quotient w / scale in float32 as compressed-tensors divides) or gptq.
As in llm-compressor, the next block's inputs come from the smoothed unquantized block with rtn and from the
quantized block with gptq. Static activation scales (quantize(..., activations="static")) are calibrated
after the smoothing, on the inputs the quantized model will see. With eager attention (llm-compressor calibrates
with it) and batches of one sample, the smoothed norms, int8 codes, weight and input scales of a 2-block Llama
equal llm-compressor 0.14's bit for bit (tests/test_w8a8_parity.py).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..engine.calibration import set_weight_matrix, weight_matrix
from ..errors import ConfigError
from ..registry import Regime, register
from .quantize import QUANT_KIND, BlockContext, QuantContext, block_step
from .smoothing import SmoothingConfig, quantize_smoothed, resolve, smoothing_needs

MINIMUM_SCALE = 1e-5  # llm-compressor's MINIMUM_SMOOTHING_SCALE

# llm-compressor's DEFAULT_SMOOTHQUANT_MAPPINGS (Llama, Mistral, Qwen2, ...), names inside a block
LLAMA_MAPPINGS = (("input_layernorm", ("q_proj", "k_proj", "v_proj")),
                  ("post_attention_layernorm", ("gate_proj", "up_proj")))


class SmoothQuantConfig(SmoothingConfig):
    """SmoothQuant's own parameters; GPTQ's (blocksize, percdamp, act_order, ...) apply with quantizer=gptq only."""

    alpha: float = Field(0.5, ge=0.0, le=1.0, description="migration strength: s = range(x)^alpha / "
                                                          "range(w)^(1-alpha)")
    quantizer: Literal["rtn", "gptq"] = Field(
        "rtn", description="the quantizer after smoothing: rtn (llm-compressor's SmoothQuant + W8A8 recipe) or gptq")
    mappings: list[tuple[str, list[str]]] | None = Field(
        None, description="[[smooth, [balance, ...]], ...] module names inside a block (a name matches itself or any "
                          "name ending in '.name'); default: input_layernorm -> q/k/v, post_attention_layernorm -> "
                          "gate/up")


@register("compress", "smoothquant", kind=QUANT_KIND, config=SmoothQuantConfig, regime=Regime.LAYERWISE,
          paper="SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models "
                "(Xiao et al., ICML 2023); as llm-compressor's SmoothQuantModifier",
          summary="migrates activation outliers into the weights (per-channel s = range(x)^a / range(w)^(1-a) folded "
                  "into the previous norm), then RTN or GPTQ; with --activations dynamic|static: W8A8",
          default_bits=8, needs=smoothing_needs)
def smoothquant(ctx: QuantContext):
    """One layer of a block SmoothQuant has smoothed: the follow-up quantizer (RTN divides in float32 as
    compressed-tensors does, so its codes equal llm-compressor's)."""
    return quantize_smoothed(ctx)


def smoothing_scales(lo: torch.Tensor, hi: torch.Tensor, weights: list, alpha: float) -> torch.Tensor:
    """s_j from the smooth layer's per-channel output extremes and the balance weights (llm-compressor's formula
    and dtypes: everything in the dtype of the observed outputs and weights)."""
    act = hi - lo
    w = 2.0 * torch.cat([x.abs().amax(dim=0, keepdim=True) for x in weights], dim=0).amax(dim=0)
    s = act.pow(alpha) / w.pow(1 - alpha)
    s = torch.where(w > 0.0, s, act)
    return torch.clamp(s, min=MINIMUM_SCALE)


def channel_extremes(run, mods: dict, smooth_names: list) -> dict:
    """One pass of the block: per smooth module, (min, max) of its output per channel over every token."""
    seen: dict = {}

    def hook(name):
        def fn(mod, args, out):
            y = out[0] if isinstance(out, tuple) else out
            y = y.detach().reshape(-1, y.shape[-1])
            lo, hi = y.amin(dim=0), y.amax(dim=0)
            if name in seen:
                seen[name] = (torch.minimum(seen[name][0], lo), torch.maximum(seen[name][1], hi))
            else:
                seen[name] = (lo, hi)
        return fn

    hooks = [mods[n].register_forward_hook(hook(n)) for n in smooth_names]
    try:
        for j in range(len(run)):
            run.forward(j)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def fold(mods: dict, smooth: str, balance: list, s: torch.Tensor, stats: dict, qualified) -> None:
    """Balance columns times s, the smooth layer's outputs divided by s (weights in their own dtype)."""
    for n in balance:
        m = mods[n]
        set_weight_matrix(m, weight_matrix(m) * s.to(torch.float32))
        if qualified(n) in stats:
            stats[qualified(n)].scale_inputs_(s.to(torch.float32))
    sm = mods[smooth]
    w = sm.weight
    w.copy_((w / (s.to(w.dtype)[:, None] if w.dim() == 2 else s.to(w.dtype))))
    if getattr(sm, "bias", None) is not None:
        sm.bias.copy_(sm.bias / s.to(sm.bias.dtype))


@block_step("smoothquant")
def smooth_block(ctx: BlockContext) -> None:
    """SmoothQuant's smoothing of one block (statistics of the unsmoothed block, then every mapping's fold)."""
    run, cfg = ctx.run, ctx.cfg
    mappings = cfg.mappings if cfg.mappings is not None else LLAMA_MAPPINGS
    mods = dict(run.block.named_modules())
    local = {run.qualified(n): n for n in mods}
    targeted = {local[n] for n in ctx.layers if n in local}
    resolved = [resolve(run.block, sp, bp, targeted) for sp, bp in mappings]
    q = run.qualified
    todo = [m for m, _ in resolved if m is not None]
    extremes = channel_extremes(run, mods, [m.smooth for m in todo]) if todo else {}
    for m, skipped in resolved:
        if skipped is not None:
            ctx.record.append({**skipped, "smooth": q(skipped["smooth"]), "balance": [q(b) for b in skipped["balance"]]})
        if m is None:
            continue
        rec = {"smooth": q(m.smooth), "balance": [q(b) for b in m.balance]}
        if m.smooth not in extremes:
            ctx.record.append({**rec, "skipped": "the calibration inputs never reached the smooth layer"})
            continue
        lo, hi = extremes[m.smooth]
        s = smoothing_scales(lo, hi, [mods[b].weight for b in m.balance], cfg.alpha)
        if not bool(torch.isfinite(s).all()):
            raise ConfigError(f"SmoothQuant: non-finite scales for {q(m.smooth)} (NaN/Inf in its calibration outputs?)")
        fold(mods, m.smooth, m.balance, s, ctx.stats, q)
        ctx.record.append({**rec, "alpha": cfg.alpha, "max_scale": float(s.max()), "min_scale": float(s.min()),
                           "act_range_max_before": float((hi - lo).max()),
                           "act_range_max_after": float(((hi - lo) / s).max())})
    if not any(m is not None or skipped is not None for m, skipped in resolved):
        where = run.name or "the model"
        raise ConfigError(f"SmoothQuant found none of its mappings' modules in {where} (it knows the Llama family's "
                          "input_layernorm -> q/k/v_proj and post_attention_layernorm -> gate/up_proj); pass "
                          "mappings=[[smooth, [balance, ...]], ...] with this architecture's module names")


def describe(records: list) -> str:
    """One line about what the smoothing did (the CLI prints it; the report holds every mapping)."""
    done = [r for r in records if "skipped" not in r]
    line = f"SmoothQuant: {len(done)} mappings smoothed"
    if done:
        red = sum(r["act_range_max_after"] / max(r["act_range_max_before"], 1e-30) for r in done) / len(done)
        line += f", largest activation range {red:.3f}x the unsmoothed one on average (calibration data)"
    skipped = [r for r in records if "skipped" in r]
    if skipped:
        line += f"; skipped {len(skipped)}: {skipped[0]['skipped']}"
    return line
