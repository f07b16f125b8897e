"""PiSSA (Meng, Wang, Zhang 2024): LoRA initialized from the principal singular triplets.

W0 = U S V^T (float32). A = diag(sqrt(S_r/s)) V_r^T, B = U_r diag(sqrt(S_r/s)), frozen base
W_res = W0 - s B A. ``niter`` > 0 uses a randomized SVD with that many subspace iterations
(the reference scripts use 16); ``niter=0`` (default) the exact SVD. The initial factors are
kept as frozen buffers (A0, B0) so that the trained adapter can be shipped as an ordinary LoRA
on the ORIGINAL W0: dW = s(BA - B0A0) = [B | B0] [A ; -A0] (rank 2r).
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import MethodConfig, Regime, register
from ..tensor.svd import randomized_svd, truncated_svd
from .layer import rank_of
from .lora import LoRA, lora_scale


class PissaConfig(MethodConfig):
    r: int = 128
    alpha: float = 128.0  # s = 1 (reference scripts)
    dropout: float = 0.0
    rslora: bool = False
    niter: int = 0  # 0: exact SVD; >0: randomized SVD with this many iterations (reference: 16)
    seed: int = 0


@register("adapt", "pissa", kind="adapter", regime=Regime.WHOLE_MODEL, config=PissaConfig,
          paper="Meng, Wang, Zhang 2024, PiSSA: Principal Singular Values and Singular Vectors Adaptation "
                "(arXiv 2404.02948)",
          summary="LoRA initialized with the top-r SVD of W, frozen residual (exact or randomized SVD)",
          layers="linear, conv1d", trainable="r*(in+out)")
class PiSSA(LoRA):
    name = "pissa"
    layer_kinds = ("linear", "conv1d")
    changes_base = True

    def create(self, layer, W0, init=True):
        out_f, in_f = W0.shape
        r = rank_of(self.cfg.r, out_f, in_f)
        dt = layer.base_layer.weight.dtype
        if init:
            s = lora_scale(self.cfg.alpha, r, self.cfg.rslora)
            U, S, Vh = (randomized_svd(W0, r, niter=self.cfg.niter, seed=self.cfg.seed) if self.cfg.niter > 0
                        else truncated_svd(W0, r))
            sq = (S / s).sqrt()
            A, B = sq[:, None] * Vh, U * sq
        else:
            A, B = torch.zeros(r, in_f), torch.zeros(out_f, r)
        layer.adapter.lora_A = nn.Parameter(A.to(dt).clone())
        layer.adapter.lora_B = nn.Parameter(B.to(dt).clone())
        layer.adapter.register_buffer("A0", A.to(dt).clone())
        layer.adapter.register_buffer("B0", B.to(dt).clone())
        layer.adapter.drop = nn.Dropout(self.cfg.dropout) if self.cfg.dropout > 0 else nn.Identity()
        if not init:
            return W0
        return W0 - self._init_delta(layer)

    def _init_delta(self, layer):
        a = layer.adapter
        return self.scale(layer) * (a.B0.float() @ a.A0.float())

    def rebase(self, layer, W0):
        return W0 - self._init_delta(layer)

    def original_weight(self, layer):
        return layer.weight_2d().float() + self._init_delta(layer)

    @classmethod
    def peft_factors(cls, t, cfg, W0, svd_rank):
        s = lora_scale(cfg.alpha, t["lora_A"].shape[0], cfg.rslora)
        B = torch.cat([t["lora_B"].float(), t["B0"].float()], 1)
        A = torch.cat([t["lora_A"].float(), -t["A0"].float()], 0)
        return s * B, A
