"""LSQ: learned step size quantization (Esser et al., "Learned Step Size Quantization", ICLR 2020),
as OFQ uses it (ref nbasyl/OFQ: src/quantization/quantizer/lsq.py).

OFQ keeps LSQ for activations and argues against it for weights: a learnable weight scale moves
every level of a row at once, which makes weights near a rounding boundary flip back and forth
(oscillate). Both are here so that the claim can be measured (benchmarks/fidelity_ofq.py).

b bits, signed: integer range [-2^(b-1), 2^(b-1) - 1]; unsigned (e.g. softmax outputs): [0, 2^b - 1].
Q(x) = s * round(clamp(x / s, lo, hi)) with a straight-through round. The scale s is learned; its
gradient is multiplied by g = 1 / sqrt(hi * N) (N = elements per scale; the paper's step-size
gradient scale), so ds = g * sum(dL/dQ * dQ/ds) with dQ/ds = round(v) - v inside the range and
lo or hi outside it (v = x / s). Initial s = 2 mean|x| / sqrt(hi) (4 mean|x| / sqrt(hi) unsigned).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize
from pydantic import Field

from ..engine.calibration import prunable_layers
from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Value x, gradient g * upstream (LSQ's step-size gradient scaling)."""
    return (x - x * g).detach() + x * g


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    if bits < 2:
        raise ConfigError(f"LSQ needs bits >= 2, got {bits}")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def lsq_fake(x: torch.Tensor, s: torch.Tensor, lo: int, hi: int, g: float) -> torch.Tensor:
    s = grad_scale(s.clamp_min(1e-5), g)
    return round_ste(torch.clamp(x / s, lo, hi)) * s


class LSQWeight(nn.Module):
    """Parametrization: weight reads as its LSQ fake-quantized value, one learnable scale per row."""

    def __init__(self, W: torch.Tensor, bits: int, learnable: bool = True):
        super().__init__()
        self.bits = bits
        self.lo, self.hi = int_range(bits, signed=True)
        W2 = W.detach().reshape(W.shape[0], -1)
        init = 2 * W2.abs().mean(dim=1, keepdim=True) / math.sqrt(self.hi)
        self.s = nn.Parameter(init.clone(), requires_grad=learnable)
        self.g = 1.0 / math.sqrt(self.hi * W2.shape[1])

    def forward(self, W):
        return lsq_fake(W.reshape(W.shape[0], -1), self.s, self.lo, self.hi, self.g).reshape(W.shape)

    @torch.no_grad()
    def levels(self, W: torch.Tensor) -> torch.Tensor:
        """Integer level of every weight (what oscillation is counted on)."""
        v = W.detach().reshape(W.shape[0], -1) / self.s.detach().clamp_min(1e-5)
        return torch.clamp(v, self.lo, self.hi).round().reshape(W.shape)


class LSQAct(nn.Module):
    """LSQ activation quantizer with OFQ's learnable biases before and after it (``channels`` > 0).

    The scale is one per tensor and is initialized from the first batch it sees (as the reference
    does), so run one forward before building the optimizer.
    """

    def __init__(self, bits: int, signed: bool = True, channels: int = 0):
        super().__init__()
        self.bits, self.signed = bits, signed
        self.lo, self.hi = int_range(bits, signed)
        self.s = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.tensor(False))
        # learnable shifts of the last dim, zero at start (OFQ's LearnableBias "move" before/after)
        self.b_in = nn.Parameter(torch.zeros(channels)) if channels else None
        self.b_out = nn.Parameter(torch.zeros(channels)) if channels else None

    def forward(self, x):
        if self.b_in is not None:
            x = x + self.b_in
        if not bool(self.initialized):
            with torch.no_grad():
                self.s.fill_((2 if self.signed else 4) * float(x.abs().mean()) / math.sqrt(self.hi))
                self.initialized.fill_(True)
        y = lsq_fake(x, self.s, self.lo, self.hi, 1.0 / math.sqrt(self.hi * x.numel()))
        return y + self.b_out if self.b_out is not None else y


def prepare_lsq_qat(model: nn.Module, bits: int = 2, learnable: bool = True, layer_filter=None) -> dict[str, nn.Module]:
    """Put the LSQ weight fake quantizer on every Linear/Conv (filtered); returns the layers by name."""
    layers = {n: m for n, m in prunable_layers(model).items() if layer_filter is None or layer_filter(n)}
    for m in layers.values():
        parametrize.register_parametrization(m, "weight", LSQWeight(m.weight, bits, learnable))
    return layers


def _quant_input(mod, args):
    return (mod.input_quant(args[0]), *args[1:])


def quantize_inputs(layers: dict[str, nn.Module], bits: int, bias: bool = True) -> None:
    """Quantize each layer's input with its own LSQAct (module attribute ``input_quant``, so its
    scale and biases are model parameters). Signed: inputs after LayerNorm/GELU can be negative."""
    for m in layers.values():
        m.input_quant = LSQAct(bits, signed=True, channels=m.weight.shape[1] if bias else 0)
        m.register_forward_pre_hook(_quant_input)


class LSQConfig(MethodConfig):
    bits: int = Field(2, ge=2, le=8, description="weight bits")
    learnable: bool = Field(True, description="learn the per-row scale (LSQ); False keeps the initial one")


@register("compress", "lsq", kind="whole", config=LSQConfig, regime=Regime.WHOLE_MODEL,
          paper="Learned Step Size Quantization (Esser et al., ICLR 2020); the baseline of OFQ (Liu et al., ICML 2023)",
          summary="QAT fake quantizer with a learnable per-row weight scale (+ LSQ activations); OFQ's baseline")
def lsq(model: nn.Module, bits: int = 2, learnable: bool = True, layer_filter=None) -> dict[str, nn.Module]:
    return prepare_lsq_qat(model, bits, learnable, layer_filter)
