"""Spherical interpolation of two models: SLERP and NuSLERP (mergekit's most used merges).

slerp: each tensor, flattened, is interpolated along the great circle between the two models' directions,
with the two norms carried by the un-normalized endpoints: out = sin((1-t)theta)/sin(theta) v0 +
sin(t theta)/sin(theta) v1, theta = the angle between v0 and v1. Nearly parallel tensors (|cos| > 0.9995)
fall back to the linear interpolation, as mergekit and the usual reference (Shoemake's) do.

nuslerp: the same with the model weights' ratio as t (t = w1 / (w0 + w1)), optionally row by row
instead of the flattened tensor, and optionally of the task vectors (model - base) when a base is given.
"""
from __future__ import annotations

import torch
from pydantic import Field

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register

DOT_THRESHOLD = 0.9995


class SlerpConfig(MethodConfig):
    t: float = Field(0.5, ge=0, le=1, description="0 gives the first model (mergekit: the base), 1 the second")


class NuSlerpConfig(MethodConfig):
    row_wise: bool = Field(False, description="interpolate the vectors along dim 0 instead of the last dim "
                                              "(only when flatten is false)")
    flatten: bool = Field(True, description="interpolate the whole flattened tensor (one angle per tensor)")


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """SLERP of two tensors taken as flat vectors (one angle per tensor)."""
    n0, n1 = v0.norm(), v1.norm()
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    dot = float((u0 * u1).sum())
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1
    theta = torch.arccos(torch.tensor(dot, dtype=torch.float64))
    s = torch.sin(theta)
    return float(torch.sin(theta - theta * t) / s) * v0 + float(torch.sin(theta * t) / s) * v1


def nuslerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, flatten: bool = True,
                    eps: float = 1e-8) -> torch.Tensor:
    """SLERP per vector along ``dim`` (or of the flattened tensors); (nearly) parallel vectors are lerped."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    theta = torch.acos((u0 * u1).sum(-1, keepdim=True).clamp(-1, 1))
    sin = torch.sin(theta)
    parallel = sin.abs() < eps
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / safe
    out = torch.where(parallel, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def _pair(tensors, base, what: str):
    pair = list(tensors) if base is None else [base, *tensors]
    if len(pair) != 2:
        raise ConfigError(f"{what} interpolates exactly two models: give two models, or a base and one model "
                          f"(got {len(pair)})")
    return pair


@register("merge", "slerp", kind="merge", config=SlerpConfig, regime=Regime.STREAMING, min_models=1,
          max_models=2, inputs=(2, 2),
          paper="Animating rotation with quaternion curves (Shoemake, 1985); mergekit's slerp merge",
          summary="spherical interpolation of two models, tensor by tensor (t=0: the first, t=1: the second)")
def slerp(tensors, base, ctx):
    v0, v1 = _pair(tensors, base, "slerp")
    return slerp_tensors(ctx.cfg.t, v0, v1)


def nuslerp_t(weights: list[float]) -> float:
    s = sum(weights)
    return 0.5 if abs(s) < 1e-6 else weights[1] / s


@register("merge", "nuslerp", kind="merge", config=NuSlerpConfig, regime=Regime.STREAMING, min_models=2,
          max_models=2,
          paper="mergekit's nuslerp merge (spherical interpolation by the models' weights, of the models or of "
                "their task vectors)",
          summary="slerp with t = w2 / (w1 + w2), per row or per tensor; of the task vectors when a base is given")
def nuslerp(tensors, base, ctx):
    if len(tensors) != 2:
        raise ConfigError(f"nuslerp interpolates exactly two models (plus an optional base), got {len(tensors)}")
    cfg: NuSlerpConfig = ctx.cfg
    t = nuslerp_t(ctx.weights)
    dim = 0 if cfg.row_wise else -1
    if base is None:
        return nuslerp_tensors(t, tensors[0], tensors[1], dim, cfg.flatten)
    return base + nuslerp_tensors(t, tensors[0] - base, tensors[1] - base, dim, cfg.flatten)
