"""Query-key reparameterization (QKR) from OFQ (Liu et al., "Oscillation-free Quantization for Low-bit
Vision Transformers", ICML 2023; ref nbasyl/OFQ: src/quantization/modules/attention.py).

In a quantized attention, q = Q(W_q) x and k = Q(W_k) x are quantized separately, so a flip of one
W_q level changes every logit through its product with all of W_k (the paper's "intertwined"
oscillation). QKR quantizes the product instead: per head h (head dim d, model dim C)

    W_qk,h = W_q,h^T W_k,h            (C x C; computed from the trained W_q, W_k every step)
    logit_h(i, j) = scale * x_i^T Q(W_qk,h) x_j,   scale = d^-1/2

with StatsQ on the stacked (H C) x C matrix (one scale per row) and an LSQ activation quantizer on
the intermediate Q(W_qk,h) x_j. The deployed q/k weight count per block is H C^2 instead of 2 C^2.
v and proj stay ordinary Linear layers, quantized as usual (StatsQ / LSQ parametrizations; this
class reads v's weight through the layer, so a parametrization on it applies).

q/k biases (DeiT has qkv_bias=True): ``qk_bias="drop"`` is the reference - q and k become
bias-free, and the conversion is NOT function-preserving (b_q^T W_k x_j changes the softmax).
``qk_bias="keep"`` (ours) keeps b_q and adds the key-side term b_q,h^T W_k,h x_j to the logits; the
other two terms (x_i^T W_q,h^T b_k,h and b_q^T b_k) are constant along a softmax row, so without
quantization the attention probabilities are unchanged.

W_q and W_k are stored as plain parameters (not Linear layers), so the usual layer walkers
(prepare_statsq_qat, CGA, prune) do not quantize or freeze them twice; CGA in QKR mode freezes
v, proj and the MLP only, as the reference does (its freeze of W_qk does not reach W_q/W_k).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from .lsq import LSQAct
from .statsq import statsq_fake, statsq_levels


class QKRAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, bits: int | None = None, act_bits: int | None = None,
                 qk_bias: Literal["drop", "keep"] = "drop", quant_softmax: bool = True, scale: float | None = None):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        if qk_bias not in ("drop", "keep"):
            raise ConfigError(f"qk_bias must be 'drop' or 'keep', got {qk_bias!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5 if scale is None else scale
        self.bits, self.act_bits, self.qk_bias = bits, act_bits, qk_bias
        self.q_weight = nn.Parameter(torch.empty(dim, dim))
        self.k_weight = nn.Parameter(torch.empty(dim, dim))
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qk_bias == "keep" else None
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.q_weight)
        nn.init.xavier_uniform_(self.k_weight)
        a = act_bits is not None
        self.input_quant = LSQAct(act_bits, True, dim) if a else nn.Identity()  # x, shared by q/k/v paths
        self.qk_act = LSQAct(act_bits, True, dim) if a else nn.Identity()  # Q(W_qk,h) x_j
        self.v_act = LSQAct(act_bits, True, dim) if a else nn.Identity()
        self.p_act = LSQAct(act_bits, False) if a and quant_softmax else nn.Identity()

    def qk_weight(self) -> torch.Tensor:
        """(H, C, C) full-precision W_q,h^T W_k,h."""
        H, d, C = self.num_heads, self.head_dim, self.dim
        return self.q_weight.reshape(H, d, C).transpose(1, 2) @ self.k_weight.reshape(H, d, C)

    def qk_weight_q(self) -> torch.Tensor:
        W = self.qk_weight()
        if self.bits is None:
            return W
        H, C = self.num_heads, self.dim
        return statsq_fake(W.reshape(H * C, C), self.bits).reshape(H, C, C)

    @torch.no_grad()
    def qk_levels(self) -> torch.Tensor:
        """StatsQ integer levels of the stacked (H C) x C matrix (for oscillation tracking)."""
        return statsq_levels(self.qk_weight().reshape(-1, self.dim), self.bits)

    def logits(self, xq: torch.Tensor) -> torch.Tensor:
        """(B, H, N, N) pre-softmax logits of already input-quantized tokens (B, N, C)."""
        qkx = self.qk_act(torch.einsum("hcd,bnd->bhnc", self.qk_weight_q(), xq))  # W_qk,h x_j
        lg = torch.einsum("bic,bhjc->bhij", xq, qkx)
        if self.q_bias is not None:
            H, d, C = self.num_heads, self.head_dim, self.dim
            u = torch.einsum("hd,hdc->hc", self.q_bias.reshape(H, d), self.k_weight.reshape(H, d, C))
            lg = lg + torch.einsum("hc,bjc->bhj", u, xq)[:, :, None, :]
        return lg * self.scale

    def forward(self, x):
        B, N, C = x.shape
        xq = self.input_quant(x)
        v = self.v_act(F.linear(xq, self.v.weight, self.v.bias))
        v = v.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        p = self.p_act(self.logits(xq).softmax(-1))
        return self.proj((p @ v).transpose(1, 2).reshape(B, N, C))

    @classmethod
    def from_attention(cls, attn: nn.Module, **kw) -> "QKRAttention":
        """From a ViT/DeiT (timm-style) attention: ``qkv`` Linear (3C x C), ``proj`` Linear, ``num_heads``."""
        qkv, proj, H = getattr(attn, "qkv", None), getattr(attn, "proj", None), getattr(attn, "num_heads", None)
        if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear) or H is None:
            raise ConfigError(f"{type(attn).__name__} is not a qkv/proj/num_heads attention; QKR cannot convert it")
        for norm in ("q_norm", "k_norm"):  # a per-head norm between projection and product breaks W_q^T W_k
            if not isinstance(getattr(attn, norm, nn.Identity()), nn.Identity):
                raise ConfigError(f"QKR needs an attention without {norm}")
        C = qkv.in_features
        if qkv.out_features != 3 * C:
            raise ConfigError(f"qkv maps {C} -> {qkv.out_features}; QKR needs 3 x {C}")
        new = cls(C, H, scale=getattr(attn, "scale", None), **kw).to(qkv.weight.device, qkv.weight.dtype)
        with torch.no_grad():
            Wq, Wk, Wv = qkv.weight.detach().split(C)
            new.q_weight.copy_(Wq)
            new.k_weight.copy_(Wk)
            new.v.weight.copy_(Wv)
            bq, _, bv = qkv.bias.detach().split(C) if qkv.bias is not None else (None, None, None)
            if bv is not None:
                new.v.bias.copy_(bv)
            else:
                new.v.bias.zero_()
            if new.q_bias is not None and bq is not None:
                new.q_bias.copy_(bq)
            new.proj.load_state_dict(proj.state_dict())
        new.train(attn.training)
        return new


def convert_qkr(model: nn.Module, bits: int | None = 2, act_bits: int | None = None, qk_bias: str = "drop",
                quant_softmax: bool = True) -> list[str]:
    """Replace every qkv/proj/num_heads attention in ``model`` (in place); returns their names."""
    done = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QKRAttention) or not all(hasattr(mod, a) for a in ("qkv", "proj", "num_heads")):
            continue
        parent, _, child = name.rpartition(".")
        new = QKRAttention.from_attention(mod, bits=bits, act_bits=act_bits, qk_bias=qk_bias,
                                          quant_softmax=quant_softmax)
        setattr(model.get_submodule(parent) if parent else model, child, new)
        done.append(name)
    if not done:
        raise ConfigError("no qkv/proj/num_heads attention found; QKR converts ViT/DeiT-style attention")
    return done


class QKRConfig(MethodConfig):
    bits: int | None = Field(2, ge=1, le=8, description="StatsQ bits of W_qk (None: not quantized)")
    act_bits: int | None = Field(None, ge=2, le=8, description="LSQ activation bits (None: float activations)")
    qk_bias: Literal["drop", "keep"] = Field("drop", description="drop q/k biases (reference) or keep b_q's "
                                             "key-side term (softmax-preserving)")
    quant_softmax: bool = Field(True, description="LSQ (unsigned) on the attention probabilities")


register("compress", "qkr", kind="whole", config=QKRConfig, regime=Regime.WHOLE_MODEL,
         paper="Oscillation-free Quantization for Low-bit Vision Transformers (Liu et al., ICML 2023)",
         summary="query-key reparameterization: quantize W_q,h^T W_k,h (H x C x C, StatsQ) instead of W_q and W_k")(
    convert_qkr)
