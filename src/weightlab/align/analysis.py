"""Why alignment works: singular values and vectors before and after permutation
(Ito, Yamada, Kumagai, "Analysis of Linear Mode Connectivity via Permutation-Based Weight
Matching", 2024).

A permutation only reorders rows and columns, W' = P_out W P_in^T, so each layer keeps its
singular values and its singular vectors are permuted. The claim: weight matching barely
shrinks ||theta_A - pi(theta_B)|| relative to ||theta_A - theta_B||, but it lines up the
singular vectors that carry large singular values, which is what keeps the midpoint good.

Per layer (2-D weights; conv kernels read as out x (in*kh*kw)):
- sv_change: max |sigma(pi(W_B)) - sigma(W_B)| / sigma_max (0 up to rounding);
- aligned: sum_j sigma_A,j |<u_A,j, u_B,j>| |<v_A,j, v_B,j>| / sum_j sigma_A,j, pairing the
  j-th singular triplets of A and B (1 = the same directions in the same order);
- overlap_k: ||U_A,k^T U_B,k||_F^2 / k, the shared part of the top-k left subspaces.
Whole model: distance ratio R = ||theta_A - pi(theta_B)|| / ||theta_A - theta_B||.
"""
from __future__ import annotations

import torch

StateDict = dict[str, torch.Tensor]


def _svd(w: torch.Tensor):
    return torch.linalg.svd(w.reshape(w.shape[0], -1).double(), full_matrices=False)


def layer_alignment(wa: torch.Tensor, wb: torch.Tensor, k: int = 8) -> dict[str, float]:
    ua, sa, vha = _svd(wa)
    ub, sb, vhb = _svd(wb)
    k = max(1, min(k, sa.numel()))
    cu = (ua * ub).sum(0).abs()
    cv = (vha * vhb).sum(1).abs()
    aligned = float((sa * cu * cv).sum() / sa.sum().clamp_min(1e-300))
    overlap = float((ua[:, :k].T @ ub[:, :k]).pow(2).sum() / k)
    return {"aligned": aligned, "overlap_k": overlap}


def alignment_analysis(a: StateDict, b: StateDict, b_aligned: StateDict, k: int = 8) -> dict:
    """Compare A with B and with pi(B) layer by layer (see the module docstring)."""
    layers = {}
    da = db = 0.0
    for name, wa in a.items():
        if not wa.is_floating_point():
            continue
        wb, wp = b[name], b_aligned[name]
        da += float((wa.double() - wb.double()).pow(2).sum())
        db += float((wa.double() - wp.double()).pow(2).sum())
        if wa.dim() < 2 or min(wa.shape[0], wa[0].numel()) < 2:
            continue
        sb = torch.linalg.svdvals(wb.reshape(wb.shape[0], -1).double())
        sp = torch.linalg.svdvals(wp.reshape(wp.shape[0], -1).double())
        before, after = layer_alignment(wa, wb, k), layer_alignment(wa, wp, k)
        layers[name] = {"sv_change": float((sb - sp).abs().max() / sb.max().clamp_min(1e-300)),
                        "aligned_before": before["aligned"], "aligned_after": after["aligned"],
                        "overlap_before": before["overlap_k"], "overlap_after": after["overlap_k"]}
    n = max(1, len(layers))
    return {
        "distance_ratio": (db / da) ** 0.5 if da > 0 else 1.0,
        "max_sv_change": max((v["sv_change"] for v in layers.values()), default=0.0),
        "aligned_before": sum(v["aligned_before"] for v in layers.values()) / n,
        "aligned_after": sum(v["aligned_after"] for v in layers.values()) / n,
        "overlap_before": sum(v["overlap_before"] for v in layers.values()) / n,
        "overlap_after": sum(v["overlap_after"] for v in layers.values()) / n,
        "k": k,
        "layers": layers,
    }
