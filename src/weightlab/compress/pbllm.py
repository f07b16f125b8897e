"""PB-LLM: partially binarized LLMs (Shang et al., "PB-LLM: Partially Binarized Large Language Models", ICLR 2024;
ref hahnyuan/PB-LLM).

Two paths, as in the reference code (they differ; both are here):

- **PTQ** (``quantize(model, "pbllm", salient=0.1)``, ref ``gptq_pb``): the salient mask is chosen
  once on the original W over the whole layer, exactly round(rho * numel) entries by |W|
  ("magnitude") or W^2 / U_jj^2 ("hessian"). The binarizer ("xnor") is fitted once on W with the
  salient entries set to 0 (still counted): per row mu = mean, alpha = mean|W - mu|, value
  mu + alpha sign(w - mu). Salient entries use a per-row asymmetric high_bit (8) min-max grid over
  the full row. Then the GPTQ loop runs with q = salient ? Q8(w) : bin(w) (``gptq=False``: plain
  rounding). rho = 1 is exactly 8-bit per-row GPTQ.
- **QAT** (``prepare_pbllm_qat``, ref ``quant/outlier_quantizer.py``): salient = the rho/2 lowest and
  rho/2 highest *signed* values of the tensor; at mask creation all of W is put on the 8-bit grid;
  forward W_sim = M W (detached, frozen) + (1 - M) alpha sign(W), alpha = mean|W[~M]| ONE scalar per
  tensor (recomputed each step, detached), sign with an identity STE. With rho = 0 this is
  sign(W) mean|W| per tensor, not the PTQ path's per-row mu + alpha sign(w - mu).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from ..engine.calibration import prunable_layers, set_weight_matrix, weight_matrix
from ..registry import MethodConfig, Regime, register
from ..tensor.gptq import obs_quantize
from ..tensor.obs import inverse_hessian_factor
from ..tensor.quant import SCALE_DTYPES, find_params, rtn, to_codes
from .packed import PBQuant
from .quantize import QUANT_KIND, QuantContext
from .statsq import EntryFreezer


def optimal_binary_scale(w: torch.Tensor) -> torch.Tensor:
    """argmin_a ||w - a sign(w)||^2 = mean|w|."""
    return w.abs().mean()


def salient_mask(scores: torch.Tensor, rho: float) -> torch.Tensor:
    """Exactly round(rho * numel) entries with the largest scores (ties by position)."""
    if not 0 <= rho <= 1:
        raise ValueError(f"salient fraction must be in [0, 1], got {rho}")
    k = int(round(rho * scores.numel()))
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[torch.sort(scores.reshape(-1), descending=True, stable=True).indices[:k]] = True
    return mask.reshape(scores.shape)


def pbllm_ptq(W: torch.Tensor, H: torch.Tensor | None, rho: float = 0.1, high_bit: int = 8,
              score: str = "magnitude", use_gptq: bool = True, blocksize: int = 128, percdamp: float = 0.01,
              scale_dtype: str = "float16") -> PBQuant:
    rows, cols = W.shape
    if use_gptq or score == "hessian":
        if H is None:
            raise ValueError("PB-LLM with GPTQ or the hessian score needs H")
        U, W64, _ = inverse_hessian_factor(H, W, percdamp)
    else:
        U, W64 = torch.eye(cols, dtype=torch.float64, device=W.device), W.double()
    d = torch.diag(U)
    sc = W64.abs() if score == "magnitude" else W64 ** 2 / d.view(1, -1) ** 2
    sal = salient_mask(sc, rho)
    dt = SCALE_DTYPES[scale_dtype]
    Wb = W64 * ~sal
    mu = Wb.mean(1).to(dt).double()
    alpha = (Wb - mu[:, None]).abs().mean(1).to(dt).double()
    s8, z8 = find_params(W64, high_bit, False, scale_dtype)
    codes8 = torch.zeros(rows, cols, dtype=torch.float64, device=W.device)
    sign = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)

    def column(j, W1, i):
        w = W1[:, i]
        c = to_codes(w, s8, z8, high_bit)
        pos = (w - mu) >= 0
        codes8[:, j] = torch.where(sal[:, j], c, torch.zeros_like(c))
        sign[:, j] = pos
        return torch.where(sal[:, j], s8 * (c - z8), mu + alpha * (pos.double() * 2 - 1))

    if use_gptq:
        obs_quantize(W64, U, column, blocksize)
    else:
        for j in range(cols):
            column(j, W64, j)
    return PBQuant(sal, codes8.to(torch.uint8), s8.to(dt), z8.to(torch.uint8), sign, mu.to(dt), alpha.to(dt), high_bit)


class PBLLMConfig(MethodConfig):
    salient: float = Field(0.1, ge=0, le=1, description="fraction rho of weights kept in high_bit bits")
    high_bit: int = Field(8, ge=2, le=8)
    score: Literal["magnitude", "hessian"] = "magnitude"
    gptq: bool = Field(True, description="GPTQ-style error feedback (False: plain rounding)")
    blocksize: int = Field(128, gt=0)
    percdamp: float = Field(0.01, ge=0)


def _needs(cfg: PBLLMConfig):
    return ("hessian",) if cfg.gptq or cfg.score == "hessian" else ()


@register("compress", "pbllm", kind=QUANT_KIND, config=PBLLMConfig, regime=Regime.LAYERWISE,
          paper="PB-LLM: Partially Binarized Large Language Models (Shang et al., ICLR 2024)",
          summary="binarize all but a salient fraction (kept in 8 bits); optimal scale; GPTQ-style reconstruction",
          zero_level=False, default_bits=1, bits_range=(1, 1), needs=_needs)
def pbllm(ctx: QuantContext):
    c = ctx.cfg
    return pbllm_ptq(ctx.weight, ctx.stats.H if ctx.stats is not None else None, c.salient, c.high_bit, c.score,
                     c.gptq, c.blocksize, c.percdamp, ctx.scale_dtype)


# --- QAT path -------------------------------------------------------------------------------
def qat_salient_mask(W: torch.Tensor, rho: float) -> torch.Tensor:
    """The rho/2 lowest and rho/2 highest signed values of the whole tensor."""
    k = int(round(rho / 2 * W.numel()))
    mask = torch.zeros(W.numel(), dtype=torch.bool, device=W.device)
    if k:
        order = torch.argsort(W.reshape(-1), stable=True)
        mask[order[:k]] = True
        mask[order[-k:]] = True
    return mask.reshape(W.shape)


def ste_sign(W: torch.Tensor) -> torch.Tensor:
    return torch.where(W.detach() >= 0, 1.0, -1.0).to(W.dtype) + (W - W.detach())


class PBBinarize(nn.Module):
    """Parametrization: salient entries pass through frozen, the rest alpha sign(W) (alpha per tensor)."""

    def __init__(self, salient: torch.Tensor):
        super().__init__()
        self.register_buffer("salient", salient)

    def forward(self, W):
        rest = W[~self.salient]
        alpha = rest.abs().mean().detach() if rest.numel() else W.new_zeros(())
        return torch.where(self.salient, W.detach(), alpha * ste_sign(W))


def prepare_pbllm_qat(model: nn.Module, rho: float = 0.1, high_bit: int = 8, layer_filter=None) -> EntryFreezer:
    """Put the PB-LLM QAT binarizer on every Linear (filtered). Returns the freezer that keeps the
    salient (8-bit) entries bit-identical through optimizer steps (call before_step/after_step)."""
    params, masks = [], {}
    for n, m in prunable_layers(model).items():
        if layer_filter is not None and not layer_filter(n):
            continue
        w = weight_matrix(m)
        set_weight_matrix(m, rtn(w, high_bit, -1).dequantize())
        sal = qat_salient_mask(weight_matrix(m), rho).reshape(m.weight.shape)
        parametrize.register_parametrization(m, "weight", PBBinarize(sal))
        p = m.parametrizations.weight.original
        params.append(p)
        masks[id(p)] = sal
    return EntryFreezer(params, lambda p: masks[id(p)])
