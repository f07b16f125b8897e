"""GradNormLoRP (Huang et al. 2024): weight-normalized low-rank update + low-rank gradient projection.

W = m * (W0 + s B A) / ||W0 + s B A||_row (DoRA-style, per output row). m = ||W0||_row, A kaiming,
B = 0, so W == W0 at init. m, A and B train; W0 is frozen. The paper's optimizer keeps Adam state
in a projected space: for a 2-D gradient G (M x N) take the top-rank SVD of G, refreshed every
``update_proj_gap`` steps; M >= N: R = G V_r (right), else R = U_r^T G (left) ("std"), or the
two-sided U^T G V ("full"); Adam runs on R and scale * project_back(update) is applied.
``wl.adapt.make_optimizer(model, lr)`` returns that optimizer (:class:`ProjectedAdamW`).
The paper's form is implemented (the released code's quirks are not copied).

Projection rank: the paper's 128 is for pretraining full weight matrices. The trainable 2-D tensors
here are the factors A (r x in) and B (out x r), whose small side is r = 8, so rank 128 would be a
complete (identity-sized) projection that saves nothing. The default ``proj_rank=None`` therefore
projects onto r // 2 directions (4 at r = 8): Adam's m and v of A are (r/2) x in instead of r x in,
of B out x (r/2) instead of out x r, about half of LoRA's optimizer state (see :func:`state_bytes`).
"""
from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from pydantic import Field

from ..registry import MethodConfig, Regime, register
from ..tensor.svd import lowrank_factor
from .layer import AdapterMethod, rank_of


class GradNormLoRPConfig(MethodConfig):
    r: int = 8
    alpha: float = 16.0
    proj_rank: int | None = Field(None, ge=1, description="rank of the gradient projection; None: r // 2 "
                                  "(a rank >= r projects the r-sided factors completely and saves no memory)")
    update_proj_gap: int = 200
    proj_scale: float = 0.25
    proj_type: Literal["std", "full"] = "std"
    seed: int | None = None


@register("adapt", "gradnormlorp", kind="adapter", regime=Regime.WHOLE_MODEL, config=GradNormLoRPConfig,
          paper="Huang et al. 2024, Gradient Weight-normalized Low-rank Projection for Efficient LLM Training "
                "(arXiv 2412.19616)",
          summary="weight-normalized low-rank update (m, A, B) trained with a low-rank projected AdamW",
          layers="linear, conv1d", trainable="r*(in+out) + out")
class GradNormLoRP(AdapterMethod):
    name = "gradnormlorp"
    invertible = False  # merge(unload=False) keeps a copy of W to undo it

    def scale(self, layer):
        return self.cfg.alpha / layer.adapter.lora_A.shape[0]

    def create(self, layer, W0, init=True):
        out_f, in_f = W0.shape
        r = rank_of(self.cfg.r, out_f, in_f)
        A = torch.zeros(r, in_f)
        if init:
            g = torch.Generator().manual_seed(self.cfg.seed) if self.cfg.seed is not None else None
            A.uniform_(-1 / math.sqrt(in_f), 1 / math.sqrt(in_f), generator=g)
        a = layer.adapter
        a.lora_A = nn.Parameter(A)
        a.lora_B = nn.Parameter(torch.zeros(out_f, r))
        a.m = nn.Parameter(W0.norm(dim=1))
        return W0

    def weight(self, layer, W):
        a = layer.adapter
        V = W + self.scale(layer) * (a.lora_B @ a.lora_A)
        return a.m[:, None] * V / V.norm(dim=1, keepdim=True)

    def delta(self, layer, W):
        return self.weight(layer, W) - W

    def row_norm(self, layer, W):
        """||W + s B A|| per output row without forming the out x in matrix (exact, gradients included):
        ||W_i||^2 + 2 s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T. Materializing W' for every target kept
        several full-size copies per layer for backward (3.6 GB peak vs LoRA's 1.3 GB on SmolLM2-135M)."""
        a, s = layer.adapter, self.scale(layer)
        dt = torch.promote_types(W.dtype, torch.float32)
        W, A, B = W.to(dt), a.lora_A.to(dt), a.lora_B.to(dt)
        with torch.no_grad():
            w2 = W.pow(2).sum(dim=1)
        n2 = w2 + 2 * s * (B * (W @ A.t())).sum(dim=1) + s * s * ((B @ (A @ A.t())) * B).sum(dim=1)
        return n2.clamp_min(torch.finfo(dt).tiny).sqrt()

    def forward(self, layer, x):
        a, base = layer.adapter, layer.base_layer
        result = base(x)  # x W^T + b in the layer's own layout (Linear or GPT-2 Conv1D)
        if base.bias is not None:
            result = result - base.bias.to(x.dtype)
        upd = (x @ a.lora_A.t().to(x.dtype)) @ a.lora_B.t().to(x.dtype)
        g = (a.m / self.row_norm(layer, layer.weight_2d())).to(x.dtype)
        out = g * (result + self.scale(layer) * upd)
        return out + base.bias.to(x.dtype) if base.bias is not None else out

    def unmerge(self, layer, Wm):
        raise ConfigError("gradnormlorp's weight normalization is not invertible; merge with unload=False "
                          "is not undone (detach or reload the base instead)")

    def trainable_count(self, out_f, in_f):
        r = rank_of(self.cfg.r, out_f, in_f)
        return r * (out_f + in_f) + out_f

    @classmethod
    def peft_factors(cls, t, cfg, W0, svd_rank):
        if W0 is None or not svd_rank:
            raise ConfigError("gradnormlorp is not LoRA-shaped: export it to PEFT with an SVD rank (svd_rank=...) "
                              "and the base model")
        s = cfg.alpha / t["lora_A"].shape[0]
        V = W0.float() + s * (t["lora_B"].float() @ t["lora_A"].float())
        Wn = t["m"].float()[:, None] * V / V.norm(dim=1, keepdim=True)
        return lowrank_factor(Wn - W0.float(), svd_rank)

    @staticmethod
    def make_optimizer(params, lr, cfg, weight_decay=0.0):
        rank = projection_rank(cfg)
        if rank >= cfg.r:
            warnings.warn(f"gradnormlorp proj_rank={rank} >= r={cfg.r}: the projection of the rank-{cfg.r} "
                          "factors is complete, so the optimizer state is as large as LoRA's; use proj_rank < r "
                          "(default r // 2) to shrink it", stacklevel=2)
        return ProjectedAdamW(params, lr=lr, rank=rank, update_proj_gap=cfg.update_proj_gap,
                              scale=cfg.proj_scale, proj_type=cfg.proj_type, weight_decay=weight_decay)


def projection_rank(cfg: GradNormLoRPConfig) -> int:
    """The gradient-projection rank the optimizer uses: ``proj_rank``, or r // 2 (at least 1) when None."""
    return cfg.proj_rank if cfg.proj_rank is not None else max(1, cfg.r // 2)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor an optimizer keeps in its state (moments, projectors, step counters):
    the measured optimizer memory, comparable across AdamW and :class:`ProjectedAdamW`."""
    def nbytes(x):
        if torch.is_tensor(x):
            return x.numel() * x.element_size()
        if isinstance(x, (tuple, list)):
            return sum(nbytes(y) for y in x)
        return 0
    return sum(nbytes(v) for st in opt.state.values() for v in st.values())


class ProjectedAdamW(torch.optim.Optimizer):
    """AdamW whose moments live in a rank-``rank`` projection of each 2-D gradient (GaLore-style).

    1-D parameters (m) get plain AdamW. With rank >= min(M, N) the projection is orthogonal and
    complete, so (with scale=1) this equals AdamW.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=128,
                 update_proj_gap=200, scale=0.25, proj_type="std"):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                                      update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type))

    @staticmethod
    def _projector(G, rank, proj_type):
        U, S, Vh = torch.linalg.svd(G.float(), full_matrices=False)
        k = min(rank, S.numel())
        if proj_type == "full":
            return ("full", U[:, :k], Vh[:k].t())
        if G.shape[0] >= G.shape[1]:
            return ("right", Vh[:k].t())  # N x k
        return ("left", U[:, :k])  # M x k

    @staticmethod
    def project(P, G):
        if P[0] == "right":
            return G @ P[1]
        if P[0] == "left":
            return P[1].t() @ G
        return P[1].t() @ G @ P[2]

    @staticmethod
    def project_back(P, R):
        if P[0] == "right":
            return R @ P[1].t()
        if P[0] == "left":
            return P[1] @ R
        return P[1] @ R @ P[2].t()

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for grp in self.param_groups:
            b1, b2 = grp["betas"]
            for p in grp["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                st = self.state[p]
                if not st:
                    st["step"] = 0
                st["step"] += 1
                t = st["step"]
                proj = p.dim() == 2
                if proj:
                    if "P" not in st or (t - 1) % grp["update_proj_gap"] == 0:
                        st["P"] = self._projector(g, grp["rank"], grp["proj_type"])
                    g = self.project(st["P"], g)
                if "m" not in st or st["m"].shape != g.shape:
                    st["m"], st["v"] = torch.zeros_like(g), torch.zeros_like(g)
                st["m"].mul_(b1).add_(g, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                mh = st["m"] / (1 - b1 ** t)
                vh = st["v"] / (1 - b2 ** t)
                upd = mh / (vh.sqrt() + grp["eps"])
                if proj:
                    upd = grp["scale"] * self.project_back(st["P"], upd)
                if grp["weight_decay"]:
                    p.mul_(1 - grp["lr"] * grp["weight_decay"])
                p.add_(upd.to(p.dtype), alpha=-grp["lr"])
        return loss
