"""AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
MLSys 2024) as llm-compressor's AWQModifier (0.14) does it, in weightlab's layer-by-layer engine.

AWQ is a block step (quantize.BlockContext) followed by an ordinary quantizer. For each block, for
each mapping smooth -> balance layers (Llama family, by module name as llm-compressor's regexes:
input_layernorm -> q/k/v_proj; v_proj -> o_proj when v_proj's outputs are o_proj's inputs (not
under grouped-query attention); post_attention_layernorm -> gate/up_proj; up_proj -> down_proj):

1. One pass of the block over its cached inputs, before any smoothing (llm-compressor's calibration
   pass), keeps every parent's (args, kwargs) (the parent: lowest common ancestor of the balance
   layers that is not a ModuleList: self_attn, mlp, or the balance layer itself) and, at each
   mapping's first balance layer, x_mean = mean over tokens of |x| per input channel. Memory: the
   parents' inputs of one block, (2 + d_ff / d) times the cached block inputs for a Llama (3 + d_ff / d with
   v_proj -> o_proj); a parent's inputs are dropped after its last mapping.
2. w_mean = mean over all rows of the balance layers of |w| / (max |w| of its (row, group) + 1e-6)
   (llm-compressor's _compute_layer_means; groups as the final grid's).
3. Grid search (n_grid = 20): with duo_scaling (default) the ratios are (0, without w) then
   r = 0, 1/18, ..., 1 with s = x_mean^r / (w_mean^(1-r) + 1e-4); without it s = x_mean^r. s is
   clamped at 1e-4 and divided by sqrt(max s * min s) (inf/NaN -> 1). The balance weights become
   Q(W s) / s, Q = RTN on the final grid (bits, group, sym, scale dtype), the parent runs on the
   captured inputs, and the loss is the mean squared difference to its unquantized output. The
   first smallest loss wins (ratio 0 without w is s = 1, plain RTN, so AWQ never does worse on
   the calibration data of a mapping).
4. The winner is folded in: balance columns W * s, the smooth layer's output divided by s (a norm's
   weight and bias, or the previous Linear's rows and bias). Without quantization the block
   computes the same function (tested to 1e-5). Input statistics of the balance layers follow
   (LayerStats.scale_inputs_), so a GPTQ follow-up sees the Hessian of the smoothed inputs.

Then every target layer of the block is quantized by ``quantizer`` (rtn, llm-compressor's
AWQ + W4A16 recipe; or gptq with GPTQ's parameters). As in llm-compressor, the next block's inputs
come from the smoothed but unquantized block with rtn (its QuantizationModifier only records
scales during calibration) and from the quantized block with gptq (which writes its weights);
``propagate`` overrides that.

Arithmetic follows llm-compressor's dtypes (float32 sums of |x|, float64 w_mean, the scales in the
promoted dtype, float32 loss sums): in a symmetric grid the largest weight of every group sits exactly
on a rounding tie (|w| / s = 7.5 at 4 bits), so last-bit differences in s flip codes and then grid
choices. For the same reason AWQ's RTN (grid search and final) divides w / scale in float32 as
compressed-tensors does; weightlab's plain RTN divides in float64, and on SmolLM2-135M (4-bit symmetric
groups of 64, fp32 scales) differs from llm-compressor's on 0.33 % of the weights (PPL 23.24 vs 22.79),
all of them such ties; a float32 quotient makes them equal on all 106 M weights. With eager attention
(llm-compressor forces it during calibration) every grid loss of a 3-block Llama equals llm-compressor's
bit for bit (checked by hand; tests/test_awq.py recomputes the grid from the formulas).

Other differences from llm-compressor: GPTQ's Hessians are those of the smoothed inputs (llm-compressor
accumulates them in the calibration pass before AWQ smooths, so its GPTQ sees the unsmoothed inputs); a
mapping whose shapes do not fit is skipped whatever its names (llm-compressor checks only v_proj/qkv_proj
-> o_proj); norms whose output is not proportional to their weight (Gemma's 1 + w) are refused, not
scaled; one process only (llm-compressor all-reduces the statistics and the loss under torch.distributed).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..engine.calibration import set_weight_matrix, to_device, weight_matrix
from ..errors import ConfigError
from ..registry import Regime, register
from ..tensor.quant import float32_groups_apply, group_index, num_groups, rtn as rtn_solve, rtn_float32_groups
from .quantize import QUANT_KIND, BlockContext, QuantContext, block_step
from .smoothing import QUOTIENT, Mapping, SmoothingConfig, quantize_smoothed, resolve, smoothing_needs


# llm-compressor's default_mappings (LlamaForCausalLM, Mistral, Qwen2/3, Granite, ...), names inside a block
LLAMA_MAPPINGS = (("input_layernorm", ("q_proj", "k_proj", "v_proj")),
                  ("v_proj", ("o_proj",)),
                  ("post_attention_layernorm", ("gate_proj", "up_proj")),
                  ("up_proj", ("down_proj",)))


class AWQConfig(SmoothingConfig):
    """AWQ's own parameters; GPTQ's (blocksize, percdamp, act_order, static_groups, precision) apply with
    quantizer=gptq only."""

    quantizer: Literal["rtn", "gptq"] = Field(
        "rtn", description="the quantizer after smoothing: rtn (llm-compressor's AWQ + W4A16 recipe) or gptq")
    duo_scaling: bool | Literal["both"] = Field(
        True, description="scales from activations and weights (true), activations only (false), or half the "
                          "grid each (both)")
    n_grid: int = Field(20, ge=3, description="grid points of the ratio search")
    mappings: list[tuple[str, list[str]]] | None = Field(
        None, description="[[smooth, [balance, ...]], ...] module names inside a block (a name matches itself "
                          "or any name ending in '.name'); default: the Llama family's four")

    @model_validator(mode="after")
    def _check(self):
        if self.duo_scaling == "both" and self.n_grid < 4:
            raise ValueError("duo_scaling=both splits the grid in two halves: n_grid must be at least 4")
        return self


@register("compress", "awq", kind=QUANT_KIND, config=AWQConfig, regime=Regime.LAYERWISE,
          paper="AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration "
                "(Lin et al., MLSys 2024); as llm-compressor's AWQModifier",
          summary="activation-aware per-channel scales (grid search on each block's outputs) folded into the "
                  "previous norm/Linear, then RTN or GPTQ",
          default_bits=4, needs=smoothing_needs)
def awq(ctx: QuantContext):
    """One layer of a block AWQ has smoothed (smooth_block): the follow-up quantizer. RTN divides in float32 as
    compressed-tensors does (its grid search and llm-compressor's QuantizationModifier round ties alike)."""
    return quantize_smoothed(ctx)


# ============================================================================ the block step


def grid(duo_scaling, n_grid: int) -> list[tuple[float, bool]]:
    """(ratio, duo) pairs in llm-compressor's order."""
    if duo_scaling == "both":
        n = n_grid // 2
        return [(i / (n - 1), duo) for i in range(n) for duo in (False, True)]
    if duo_scaling:
        return [(0.0, False)] + [(i / (n_grid - 2), True) for i in range(n_grid - 1)]
    return [(i / (n_grid - 1), False) for i in range(n_grid)]


def scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float, duo: bool) -> torch.Tensor:
    """The per-input-channel scale s of one grid point, in llm-compressor's dtypes (x_mean float32, w_mean
    float64: float64 with duo scaling, float32 without)."""
    if duo:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def weight_means(weights: list, group_size: int) -> torch.Tensor:
    """Per input channel: mean over all rows of all ``weights`` of |w| / (max |w| of its (row, group) + 1e-6)."""
    total, rows = None, 0
    for w in weights:
        a = w.abs()
        cols = a.shape[1]
        amax = torch.empty(a.shape[0], num_groups(cols, group_size), dtype=a.dtype, device=a.device)
        for g in range(amax.shape[1]):
            sl = slice(0, cols) if group_size <= 0 else slice(g * group_size, min((g + 1) * group_size, cols))
            amax[:, g] = a[:, sl].amax(dim=1)
        norm = a / (amax[:, group_index(cols, group_size, a.device)] + 1e-6)
        s = norm.sum(0, dtype=torch.float64)
        total = s if total is None else total + s
        rows += a.shape[0]
    return total / rows


def _without_cache(kwargs: dict) -> dict:
    """A KV cache in the captured kwargs would grow at every replay of the parent: dropped."""
    return {k: (None if k in ("past_key_value", "past_key_values") else v) for k, v in kwargs.items()}


def capture(run, mods: dict, mappings: list) -> tuple[dict, dict]:
    """One pass of the (not yet smoothed) block over its cached inputs, as llm-compressor's calibration pass:
    every parent's (args, kwargs) per input, and mean |x| per channel at each mapping's first balance layer."""
    kept = {m.parent: [] for m in mappings}
    sums: dict = {}

    def keep(name):
        def hook(mod, args, kwargs):
            kept[name].append((to_device(args, run.cache_device),
                               to_device(_without_cache(kwargs), run.cache_device)))
        return hook

    def seen(name):
        def hook(mod, args, out):
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1])
            s = rows.abs().float().sum(0)  # float32 sums, as llm-compressor: the scales' last bits decide roundings
            acc = sums.setdefault(name, [torch.zeros_like(s), 0])
            acc[0] += s
            acc[1] += rows.shape[0]
        return hook

    hooks = [mods[p].register_forward_pre_hook(keep(p), with_kwargs=True) for p in kept]
    hooks += [mods[b].register_forward_hook(seen(b)) for b in {m.balance[0] for m in mappings}]
    try:
        for j in range(len(run)):
            run.forward(j)
    finally:
        for h in hooks:
            h.remove()
    x_means = {b: acc[0] / torch.tensor(max(acc[1], 1)) for b, acc in sums.items()}
    return kept, x_means


def _outputs(parent: nn.Module, kept: list, dev):
    for a, k in kept:
        out = parent(*to_device(a, dev), **to_device(k, dev))
        yield out[0] if isinstance(out, (tuple, list)) else out


def output_mse(parent: nn.Module, kept: list, reference: list, dev) -> float:
    """Mean squared difference of the parent's outputs to ``reference`` over all elements (llm-compressor's
    arithmetic: a summed mse_loss per batch in the output dtype, added up in float32)."""
    tot, n = torch.zeros((), dtype=torch.float32, device=dev), 0
    for out, ref in zip(_outputs(parent, kept, dev), reference):
        tot += F.mse_loss(out, ref.to(out.device), reduction="sum")
        n += ref.numel()
    return float(tot / max(n, 1))


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, scale_dtype: str) -> torch.Tensor:
    """``rtn(w, ..., quotient_dtype=QUOTIENT).dequantize()``, bit for bit, without its integer layer (the grid
    search quantizes every balance layer 20 times per mapping)."""
    if not float32_groups_apply(w, group_size, QUOTIENT):  # e.g. a partial last group: the general path
        return rtn_solve(w, bits, group_size, sym, scale_dtype, quotient_dtype=QUOTIENT).dequantize()
    codes, s, z = rtn_float32_groups(w, bits, group_size, sym, scale_dtype)
    return (s * (codes - z)).reshape(w.shape)  # AffineQuant.dequantize's float32 arithmetic


def pseudo_quantize(w: torch.Tensor, s: torch.Tensor, ctx: BlockContext, dtype: torch.dtype) -> torch.Tensor:
    """Q(W s) / s on the final grid, in the dtype of s; W s is first rounded to the layer's dtype, as the weight
    the final quantizer will see after the fold (and as llm-compressor, which writes W s into the weight)."""
    q = fake_quantize((w.to(s.dtype) * s).to(dtype), ctx.bits, ctx.group_size, ctx.sym, ctx.scale_dtype)
    return q.to(s.dtype) / s


@torch.no_grad()
def smooth_mapping(ctx: BlockContext, m: Mapping, kept: list, x_mean: torch.Tensor | None) -> dict:
    """Grid-search the scales of one mapping on its parent's captured inputs and fold the best into the block;
    returns the record."""
    run, cfg = ctx.run, ctx.cfg
    block, dev = run.block, run.device
    mods = dict(block.named_modules())
    parent = mods[m.parent]
    q = run.qualified
    rec = {"smooth": q(m.smooth), "balance": [q(n) for n in m.balance], "parent": q(m.parent)}
    if x_mean is None or not kept:
        return {**rec, "skipped": "the calibration inputs never reached the balance layers"}
    reference = [o.to(run.cache_device) for o in _outputs(parent, kept, dev)]
    if not all(bool(torch.isfinite(o).all()) for o in reference):
        return {**rec, "skipped": "NaN/Inf in the parent's unquantized outputs"}
    orig = {n: weight_matrix(mods[n]) for n in m.balance}
    quantized = [n for n in m.balance if q(n) in ctx.layers]
    x_mean = x_mean.to(dev)
    w_mean = weight_means([orig[n] for n in quantized], ctx.group_size).to(dev) if cfg.duo_scaling else None
    best, best_s, history = float("inf"), None, []
    for ratio, duo in grid(cfg.duo_scaling, cfg.n_grid):
        s = scales(x_mean, w_mean, ratio, duo)
        for n in quantized:
            set_weight_matrix(mods[n], pseudo_quantize(orig[n], s, ctx, mods[n].weight.dtype))
        loss = output_mse(parent, kept, reference, dev)
        history.append([ratio, duo, loss])
        if loss < best:
            best, best_s, best_at = loss, s, (ratio, duo)
    del reference
    if best_s is None:
        raise ConfigError(f"AWQ: no finite loss in the grid search of {q(m.smooth)} (NaN in the forward of "
                          f"{q(m.parent)}?)")
    # fold: W * s into the balance columns, 1 / s into the smooth layer's outputs
    for n in m.balance:
        set_weight_matrix(mods[n], orig[n].to(best_s.dtype) * best_s)
        if q(n) in ctx.stats:
            ctx.stats[q(n)].scale_inputs_(best_s)
    sm = mods[m.smooth]
    w = sm.weight
    w.copy_((w.to(best_s.dtype) / (best_s[:, None] if w.dim() == 2 else best_s)).to(w.dtype))
    if getattr(sm, "bias", None) is not None:
        sm.bias.copy_((sm.bias.to(best_s.dtype) / best_s).to(sm.bias.dtype))
    return {**rec, "ratio": best_at[0], "duo_scaling": best_at[1], "initial_error": history[0][2],
            "best_error": best, "grid": history}


@block_step("awq")
def smooth_block(ctx: BlockContext) -> None:
    """AWQ's smoothing of one block, mapping by mapping (in order), before its layers are quantized."""
    mappings = ctx.cfg.mappings if ctx.cfg.mappings is not None else LLAMA_MAPPINGS
    local = {ctx.run.qualified(n): n for n in dict(ctx.run.block.named_modules())}
    targeted_local = {local[n] for n in ctx.layers if n in local}
    q = ctx.run.qualified
    resolved = [resolve(ctx.run.block, smooth_pat, balance_pats, targeted_local)
                for smooth_pat, balance_pats in mappings]
    todo = [m for m, _ in resolved if m is not None]
    kept, x_means = capture(ctx.run, dict(ctx.run.block.named_modules()), todo) if todo else ({}, {})
    for m, skipped in resolved:
        if skipped is not None:
            ctx.record.append({**skipped, "smooth": q(skipped["smooth"]),
                               "balance": [q(b) for b in skipped["balance"]]})
        if m is None:
            continue
        todo.pop(0)
        ctx.record.append(smooth_mapping(ctx, m, kept[m.parent], x_means.get(m.balance[0])))
        if all(later.parent != m.parent for later in todo):
            del kept[m.parent]  # this parent's inputs are no longer needed
    if not any(m is not None or skipped is not None for m, skipped in resolved):
        where = ctx.run.name or "the model"
        raise ConfigError(f"AWQ found none of its mappings' modules in {where} (it knows the Llama family's "
                          "input_layernorm/q,k,v_proj/o_proj/post_attention_layernorm/gate,up,down_proj); pass "
                          "mappings=[[smooth, [balance, ...]], ...] with this architecture's module names")


def describe(records: list) -> str:
    """One line about what AWQ's smoothing did (the CLI prints it; the report holds every mapping's grid)."""
    done = [r for r in records if "skipped" not in r]
    skipped: dict = {}
    for r in records:
        if "skipped" in r:
            key = r["smooth"].rsplit(".", 1)[-1] + " -> " + ", ".join(b.rsplit(".", 1)[-1] for b in r["balance"])
            skipped.setdefault(key, []).append(r["skipped"])
    red = [r["best_error"] / r["initial_error"] for r in done if r["initial_error"] > 0]
    line = (f"AWQ: {len(done)} mappings smoothed" + (f", output error {sum(red) / len(red):.3f}x RTN's on average "
                                                   "(calibration data)" if red else ""))
    for key, why in skipped.items():
        line += f"; skipped {key} in {len(why)} block(s): {why[0]}"
    return line
