"""SORSA (Cao 2024): trainable singular vectors/values with an orthonormal regularizer.

W = W_res + s B diag(S) A; B = U_r, S = S_r, A = V_r^T from the SVD of W0, W_res frozen,
s = 1 (alpha None) else alpha/r. L_orth = (1/n) sum_layers (||A A^T - I||_F + ||B^T B - I||_F)
with n the number of A and B matrices (norms not squared). Reference placement: clip the task
gradients (max norm 1), THEN backpropagate gamma/lr_base * L_orth (base LR, not the scheduled
one), then step: ``wl.adapt.backward_regularizers(model)`` between clipping and ``step()``.
Defaults gamma 4e-4, lr_base 3e-5. The SVD runs in float32 (the reference's intended cast is
a no-op there, so it runs in the weight dtype; float32 is the documented intent).
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import MethodConfig, Regime, register
from ..tensor.svd import truncated_svd
from .layer import AdapterMethod, rank_of


class SorsaConfig(MethodConfig):
    r: int = 128
    alpha: float | None = None  # None: s = 1
    gamma: float = 4e-4
    lr_base: float = 3e-5


@register("adapt", "sorsa", kind="adapter", regime=Regime.WHOLE_MODEL, config=SorsaConfig,
          paper="Cao 2024, SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation of "
                "Large Language Models (arXiv 2409.00055)",
          summary="trainable U, S, V of the top-r SVD, frozen residual, orthonormal regularizer after clipping",
          layers="linear, conv1d", trainable="r*(in+out) + r")
class SORSA(AdapterMethod):
    name = "sorsa"
    changes_base = True

    def scale(self, layer) -> float:
        return 1.0 if self.cfg.alpha is None else self.cfg.alpha / layer.adapter.S.shape[0]

    def create(self, layer, W0, init=True):
        out_f, in_f = W0.shape
        r = rank_of(self.cfg.r, out_f, in_f)
        if init:
            U, S, Vh = truncated_svd(W0, r)
        else:
            U, S, Vh = torch.zeros(out_f, r), torch.zeros(r), torch.zeros(r, in_f)
        a = layer.adapter
        # adapters in float32 as in the reference (the residual keeps the weight dtype)
        a.B, a.S, a.A = nn.Parameter(U.clone()), nn.Parameter(S.clone()), nn.Parameter(Vh.clone())
        a.register_buffer("B0", U.clone())
        a.register_buffer("S0", S.clone())
        a.register_buffer("A0", Vh.clone())
        return W0 - self._init_delta(layer) if init else W0

    def _init_delta(self, layer):
        a = layer.adapter
        return self.scale(layer) * ((a.B0 * a.S0) @ a.A0)

    def rebase(self, layer, W0):
        return W0 - self._init_delta(layer)

    def original_weight(self, layer):
        return layer.weight_2d().float() + self._init_delta(layer)

    def delta(self, layer, W):
        a = layer.adapter
        return self.scale(layer) * ((a.B * a.S) @ a.A)

    def delta_forward(self, layer, x):
        a = layer.adapter
        return ((x.to(a.A.dtype) @ a.A.t()) * (self.scale(layer) * a.S)) @ a.B.t()

    def forward(self, layer, x):
        return layer.base_layer(x) + self.delta_forward(layer, x).to(x.dtype)

    def regularizer(self, layer):
        a = layer.adapter
        r = a.S.shape[0]
        eye = torch.eye(r, device=a.A.device, dtype=a.A.dtype)
        val = torch.linalg.matrix_norm(a.A @ a.A.t() - eye) + torch.linalg.matrix_norm(a.B.t() @ a.B - eye)
        return val, 2  # two matrices (A and B) per layer

    def regularizer_weight(self) -> float:
        return self.cfg.gamma / self.cfg.lr_base

    def trainable_count(self, out_f, in_f):
        r = rank_of(self.cfg.r, out_f, in_f)
        return r * (out_f + in_f) + r

    @classmethod
    def peft_factors(cls, t, cfg, W0, svd_rank):
        r = t["S"].shape[0]
        s = 1.0 if cfg.alpha is None else cfg.alpha / r
        B = torch.cat([t["B"].float() * t["S"].float(), t["B0"].float() * t["S0"].float()], 1)
        A = torch.cat([t["A"].float(), -t["A0"].float()], 0)
        return s * B, A
