"""Bat: weight-guided block-affine adapter ("Bat" in arXiv 2409.15371 v4+, "Bone" in v1-v3;
PEFT MiSS with ``init_weights="bat"``).

r divides both in and out. W is split into r x r blocks W_ab (a: output block, b: input
block); trainable T (out/r x r x r), zero init. dW_ab = W_ab T_a + T_a, so
W'_ab = W_ab (I + T_a) + T_a. The forward materializes W' (no low-rank shortcut); the gradient
is dL/dT_a = sum_b (W_ab^T G_ab + G_ab) with G = dL/dW'. Unmerge: W_ab = (W'_ab - T_a)(I + T_a)^-1
in float32. Parameters out*r. PEFT export only as an SVD-truncated LoRA (``svd_rank``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from ..tensor.svd import lowrank_factor
from .layer import AdapterMethod


class BatConfig(MethodConfig):
    r: int = 64
    init: str = "zeros"  # "zeros" or "random" (tests)
    seed: int = 0


def _blocks(W: torch.Tensor, r: int) -> torch.Tensor:
    out_f, in_f = W.shape
    return W.reshape(out_f // r, r, in_f // r, r).permute(0, 2, 1, 3)  # (a, b, r, r)


def _unblocks(Wb: torch.Tensor) -> torch.Tensor:
    a, b, r, _ = Wb.shape
    return Wb.permute(0, 2, 1, 3).reshape(a * r, b * r)


def bat_delta(W: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    r = T.shape[-1]
    Wb = _blocks(W, r)
    return _unblocks(Wb @ T[:, None] + T[:, None])


@register("adapt", "bat", kind="adapter", regime=Regime.WHOLE_MODEL, config=BatConfig,
          paper="Kang 2024, Bone/Bat: Block-Affine Adaptation of Large Language Models (arXiv 2409.15371 v4+, "
                "weight-guided form); PEFT MiSS init_weights='bat'",
          summary="weight-guided block affine update W_ab T_a + T_a (zero init), out*r parameters",
          layers="linear, conv1d", trainable="out*r")
class Bat(AdapterMethod):
    name = "bat"
    materialize = True

    def create(self, layer, W0, init=True):
        out_f, in_f = W0.shape
        r = self.cfg.r
        if out_f % r or in_f % r:
            raise ConfigError(f"bat needs r={r} to divide both dimensions of '{layer.layer_name}' ({out_f}x{in_f})")
        T = torch.zeros(out_f // r, r, r)
        if init and self.cfg.init == "random":
            T.normal_(0, 0.02, generator=torch.Generator().manual_seed(self.cfg.seed))
        layer.adapter.T = nn.Parameter(T.to(layer.base_layer.weight.dtype))
        return W0

    def delta(self, layer, W):
        return bat_delta(W, layer.adapter.T.to(W.dtype))

    def unmerge(self, layer, Wm):
        T = layer.adapter.T.detach().float()
        r = T.shape[-1]
        eye = torch.eye(r)
        Wb = _blocks(Wm.float(), r) - T[:, None]
        # X (I + T) = Y  <=>  (I + T)^T X^T = Y^T
        X = torch.linalg.solve((eye + T).transpose(-1, -2)[:, None], Wb.transpose(-1, -2)).transpose(-1, -2)
        return _unblocks(X)

    def trainable_count(self, out_f, in_f):
        return out_f * self.cfg.r

    @classmethod
    def peft_factors(cls, t, cfg, W0, svd_rank):
        if W0 is None or not svd_rank:
            raise ConfigError("bat is not LoRA-shaped: export it to PEFT with an SVD rank (svd_rank=..., "
                              "--svd-rank) and the base model")
        return lowrank_factor(bat_delta(W0.float(), t["T"].float()), svd_rank)
