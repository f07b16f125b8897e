"""Bone: block-affine additive adapter (the v4+ "Bone" of arXiv 2409.15371; PEFT's MiSS default).

Naming trap: v1-v3 of the paper ("Block Affine Transformation") call the weight-guided form
"Bone"; v4+ ("Block Affine Adaptation") call this plain shared-block form "Bone" and the
weight-guided one "Bat" (``weightlab.adapt.bat``). PEFT renamed BoneConfig to MissConfig:
``init_weights=True`` is this method, ``"bat"`` is Bat.

Trainable M (r x out), zero init. dW[o, j*r + k] = M[k, o] (M^T tiled along the input); the
fast path is y = base(x) + (sum_j x[..., j*r:(j+1)*r]) M, with x zero-padded when r does not
divide in. Parameters r*out. The delta is exactly rank <= r: dW = M^T E with E (r x in) the
tiled identity, so it exports to PEFT as an exact LoRA without SVD.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import MethodConfig, Regime, register
from .layer import AdapterMethod


class BoneConfig(MethodConfig):
    r: int = 64
    init: str = "zeros"  # "zeros" (paper/PEFT) or "random" (tests)
    seed: int = 0


def tiled_identity(r: int, in_f: int, dtype=torch.float32) -> torch.Tensor:
    """E (r x in) with E[k, j*r + k] = 1."""
    idx = torch.arange(in_f)
    E = torch.zeros(r, in_f, dtype=dtype)
    E[idx % r, idx] = 1
    return E


@register("adapt", "bone", kind="adapter", regime=Regime.WHOLE_MODEL, config=BoneConfig,
          paper="Kang 2024, Bone: Block-Affine Adaptation of Large Language Models (arXiv 2409.15371 v4+); "
                "PEFT MiSS",
          summary="shared r x out block tiled along the input (additive, zero init), r*out parameters",
          layers="linear, conv1d", trainable="r*out")
class Bone(AdapterMethod):
    name = "bone"

    def create(self, layer, W0, init=True):
        out_f, _ = W0.shape
        r = self.cfg.r
        M = torch.zeros(r, out_f)
        if init and self.cfg.init == "random":
            M.normal_(0, 0.02, generator=torch.Generator().manual_seed(self.cfg.seed))
        layer.adapter.M = nn.Parameter(M.to(layer.base_layer.weight.dtype))
        return W0

    def delta(self, layer, W):
        M = layer.adapter.M.float()
        r = M.shape[0]
        in_f = W.shape[1]
        reps = -(-in_f // r)
        return M.t().repeat(1, reps)[:, :in_f]

    def delta_forward(self, layer, x):
        M = layer.adapter.M
        r = M.shape[0]
        in_f = x.shape[-1]
        pad = (-in_f) % r
        if pad:
            x = F.pad(x, (0, pad))
        xs = x.reshape(*x.shape[:-1], -1, r).sum(-2)
        return xs @ M.to(x.dtype)

    def trainable_count(self, out_f, in_f):
        return self.cfg.r * out_f

    @classmethod
    def peft_factors(cls, t, cfg, W0, svd_rank):
        M = t["M"].float()
        in_f = W0.shape[1] if W0 is not None else None
        if in_f is None:
            raise ValueError("Bone export needs the layer's input size")
        return M.t().contiguous(), tiled_identity(M.shape[0], in_f)
