"""TSV-M: Task Singular Vectors merging (Gargiulo et al., "Task Singular Vectors: Reducing Task
Interference in Model Merging", CVPR 2025). R-TSVM / RESM builds on it in rtsvm.py.

Per 2-D weight: keep each task's top k = floor(min(m, n) / T) singular triplets, stack the
left and right singular vectors, replace each stack by its polar (closest orthonormal)
factor, and rebuild Delta = U S V^T; theta = base + alpha * Delta. Other tensors (biases,
norms, excluded names) take the mean of the task vectors, as the reference does.
Triplets with sigma <= rel_eps * sigma_max are dropped (ours): their singular vectors are
arbitrary and would perturb the polar factor.
"""
from __future__ import annotations

import fnmatch

import torch
from pydantic import Field

from ..registry import MethodConfig, Regime, register
from ..tensor.linalg import polar_factor


class TsvConfig(MethodConfig):
    alpha: float = Field(1.0, description="scale of the merged update (reference grid-searches it; 1.0 without data)")
    exclude: list[str] = Field(default_factory=lambda: ["*text_projection*"],
                               description="glob patterns of 2-D tensors merged by the mean instead")
    rel_eps: float = Field(1e-6, ge=0, description="drop triplets with sigma <= rel_eps * largest sigma")


def tsv_merge_matrix(deltas: list[torch.Tensor], k: int | list[int], rel_eps: float = 1e-6,
                     task_weights: list[float] | None = None) -> torch.Tensor:
    """Delta = polar(U) diag(S) polar(V)^T from each task's top-k singular triplets."""
    us, ss, vs = [], [], []
    ks = k if isinstance(k, list) else [k] * len(deltas)
    for i, d in enumerate(deltas):
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        ki = min(ks[i], s.numel())
        keep = s[:ki] > rel_eps * (s[0] if s.numel() else 0)
        ki = int(keep.sum())
        if ki == 0:
            continue
        us.append(u[:, :ki])
        ss.append(s[:ki] * (task_weights[i] if task_weights else 1.0))
        vs.append(vh[:ki].T)
    if not us:
        return torch.zeros_like(deltas[0])
    u_cat, s_cat, v_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    return polar_factor(u_cat) @ torch.diag(s_cat) @ polar_factor(v_cat).T


def _is_matrix(name: str, t: torch.Tensor, exclude: list[str], n_tasks: int) -> bool:
    return t.dim() == 2 and min(t.shape) >= n_tasks and not any(fnmatch.fnmatchcase(name, p) for p in exclude)


@register("merge", "tsv-m", kind="merge", config=TsvConfig, regime=Regime.STREAMING, requires_base=True,
          aliases=("tsvm", "tsv"), device_capable=True,
          paper="Task Singular Vectors: Reducing Task Interference in Model Merging (Gargiulo et al., 2025)",
          summary="per-layer low-rank task updates with decorrelated (orthogonalized) singular vectors")
def tsv_m(tensors, base, ctx):
    cfg: TsvConfig = ctx.cfg
    deltas = [t - base for t in tensors]
    if not _is_matrix(ctx.name, base, cfg.exclude, len(deltas)):
        return base + torch.stack(deltas).mean(0)
    k = min(base.shape) // len(deltas)
    return base + cfg.alpha * tsv_merge_matrix(deltas, k, cfg.rel_eps)

