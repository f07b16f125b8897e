"""What the smoothing quantizers (AWQ, SmoothQuant) share: their config base (the quantizer after smoothing and
what the next block sees), the follow-up quantizer of each smoothed layer, and how a mapping smooth -> balance
layers is found inside a block (by module name, as llm-compressor's regexes)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..tensor.quant import rtn as rtn_solve
from .gptq import GPTQConfig, gptq as gptq_layer
from .quantize import QuantContext

QUOTIENT = torch.float32  # compressed-tensors' w / scale (float32 weights): ties round as in llm-compressor


class SmoothingConfig(GPTQConfig):
    """What the smoothing methods (AWQ, SmoothQuant) share: the quantizer after smoothing and what the next block
    sees; GPTQ's parameters (blocksize, percdamp, act_order, static_groups, precision) apply with quantizer=gptq only."""

    quantizer: Literal["rtn", "gptq"] = Field("rtn", description="the quantizer after smoothing: rtn or gptq")
    propagate: Literal["auto", "fp", "quantized"] = Field(
        "auto", description="next block's inputs from the smoothed unquantized block (fp) or the quantized one; "
                            "auto: fp with rtn, quantized with gptq (as llm-compressor)")

    @model_validator(mode="after")
    def _gptq_only(self):
        gptq_only = sorted(self.model_fields_set & set(GPTQConfig.model_fields))
        if self.quantizer != "gptq" and gptq_only:
            raise ValueError(f"{', '.join(gptq_only)}: GPTQ parameters; add quantizer=gptq to use them")
        return self

    @property
    def propagate_quantized(self) -> bool:
        return self.propagate == "quantized" or (self.propagate == "auto" and self.quantizer == "gptq")


def smoothing_needs(cfg: SmoothingConfig) -> tuple:
    return ("block", "hessian") if cfg.quantizer == "gptq" else ("block",)


def quantize_smoothed(ctx: QuantContext):
    """One layer of a smoothed block: GPTQ, or RTN dividing w / scale in float32 as compressed-tensors does (so
    ties round as in llm-compressor)."""
    if ctx.cfg.quantizer == "gptq":
        return gptq_layer(ctx)
    return rtn_solve(ctx.weight, ctx.bits, ctx.group_size, ctx.sym, ctx.scale_dtype, quotient_dtype=QUOTIENT)


@dataclass
class Mapping:
    smooth: str  # names inside the block
    balance: list
    parent: str


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _width(mod: nn.Module) -> int | None:
    """How many channels the smooth module outputs (None: not a module whose output scales with its weight)."""
    if isinstance(mod, nn.Linear):
        return mod.out_features
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1 and not type(mod).__name__.startswith("Gemma"):
        return w.numel()  # norms: y = w * normalized(x) (+ b); Gemma's RMSNorm scales by 1 + w
    return None


def parent_name(block: nn.Module, names: list) -> str:
    """The lowest common ancestor of ``names`` that is not a ModuleList ("" = the block); one name: itself."""
    parts = [n.split(".") for n in names]
    common = []
    for xs in zip(*parts):
        if any(x != xs[0] for x in xs):
            break
        common.append(xs[0])
    name = ".".join(common)
    while name and isinstance(block.get_submodule(name), nn.ModuleList):
        name = name.rpartition(".")[0]
    return name


def resolve(block: nn.Module, smooth_pat: str, balance_pats, targeted) -> tuple[Mapping | None, dict | None]:
    """(mapping, None), or (None, {"smooth", "balance", "skipped": reason}) with names inside the block, or
    (None, None) when none of the mapping's names exist in the block."""
    mods = dict(block.named_modules())
    smooth = [n for n in mods if n and _matches(n, smooth_pat)]
    balance = [n for p in balance_pats for n in mods if n and _matches(n, p)]
    if not smooth and not balance:
        return None, None

    def skip(why):
        return None, {"smooth": smooth[0] if len(smooth) == 1 else smooth_pat, "balance": balance or list(balance_pats),
                      "skipped": why}

    if len(smooth) != 1:
        return skip(f"{len(smooth)} modules match the smooth layer '{smooth_pat}' (one is needed)")
    if not balance:
        return skip(f"no balance layer matches {list(balance_pats)}")
    width = _width(mods[smooth[0]])
    if width is None:
        return skip(f"{type(mods[smooth[0]]).__name__} is not a Linear or a norm whose output is proportional to "
                    "its weight")
    for n in balance:
        if not isinstance(mods[n], nn.Linear):
            return skip(f"balance layer {n} is a {type(mods[n]).__name__}, not nn.Linear")
        if mods[n].in_features != width:
            return skip(f"{smooth[0]} outputs {width} channels, {n} takes {mods[n].in_features} (as llm-compressor "
                        "skips v_proj -> o_proj under grouped-query attention)")
    if not any(n in targeted for n in balance):
        return skip("none of the balance layers is quantized")
    return Mapping(smooth[0], balance, parent_name(block, balance)), None
