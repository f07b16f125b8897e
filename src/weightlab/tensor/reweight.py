"""Per-sample loss reweighting and label-distributionally-robust losses (pure math).

- Dynamic loss-based reweighting (Sow et al., ICLR 2025): losses -> h in [-1, 1] ->
  strategy f(h) -> w = softmax(f(h) / r).
- KL-regularised DRO instance weights (DONE, Zhang et al.): w = softmax(loss / r), the
  maximiser of sum_i w_i l_i - r KL(w || uniform).
- LDR-KL and adaptive ALDR-KL losses (Zhu et al., ICML 2023).

Weights are computed without gradient: the training loss is sum_i w_i * l_i with w fixed.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

# strategy f(h), h in [-1, 1] (reference names in brackets)
STRATEGIES = {
    "linupper": lambda h: torch.minimum(h + 1, torch.ones_like(h)),  # [linupper] down-weights low losses
    "quadratic": lambda h: 1 - h * h,  # [mid] down-weights both extremes
    "extremes": lambda h: h.abs(),  # [extremes] up-weights both extremes
    "upper": lambda h: 0.5 * h + 0.5,  # [upper] linear in the loss
    "uniform": lambda h: torch.zeros_like(h),
}
STRATEGY_ALIASES = {"mid": "quadratic"}


def normalized_losses(losses: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """h_i = (2 L_i - (L_max + L_min)) / max(L_max - L_min, eps): the batch's losses mapped to [-1, 1]."""
    l = losses.detach().double().reshape(-1)
    lo, hi = l.min(), l.max()
    return (2 * l - (hi + lo)) / torch.clamp(hi - lo, min=eps)


def loss_reweight_weights(losses: torch.Tensor, strategy: str = "linupper", temperature: float = 0.4,
                          counts: torch.Tensor | None = None) -> torch.Tensor:
    """Sample weights (sum 1, no gradient) from per-sample losses of one (global) batch.

    w = softmax(f(h) / temperature). With `counts` (e.g. active tokens per sequence) the
    weights are multiplied by the counts and renormalised, so uniform weights give the
    token-weighted mean, as in the reference trainer.
    """
    name = STRATEGY_ALIASES.get(strategy, strategy)
    if name not in STRATEGIES:
        raise ValueError(f"unknown reweighting strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if losses.numel() == 0:
        return losses.detach().double().reshape(-1)
    f = STRATEGIES[name](normalized_losses(losses))
    w = torch.softmax(f / temperature, dim=0)  # softmax subtracts the max; temperature=inf -> uniform
    if counts is not None:
        c = counts.detach().double().reshape(-1)
        if c.shape != w.shape:
            raise ValueError(f"counts has {c.numel()} entries for {w.numel()} losses")
        w = w * c
        w = w / w.sum().clamp_min(1e-300)
    return w.to(losses.dtype if losses.is_floating_point() else torch.float64)


def kl_dro_weights(losses: torch.Tensor, temperature: float = 1.0, log_u: torch.Tensor | float | None = None
                   ) -> torch.Tensor:
    """KL-regularised DRO weights w_i = exp(l_i/r) / sum_j exp(l_j/r), no gradient.

    They maximise sum_i w_i l_i - r * sum_i w_i log(n w_i) over the simplex. With `log_u`
    (log of a running estimate u of mean_j exp(l_j/r), DONE's CID option) the weights are
    exp(l_i/r) / (n u) instead, which need not sum to 1 within a batch.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    z = losses.detach().double().reshape(-1) / temperature
    if log_u is None:
        w = torch.softmax(z, dim=0)
    else:
        w = torch.exp(z - torch.as_tensor(log_u, dtype=torch.float64)) / z.numel()
    return w.to(losses.dtype)


def kl_dro_value(losses: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """r * log(mean_i exp(l_i / r)): the optimal value of the inner maximisation (differentiable).

    Its gradient equals that of sum_i w_i l_i with w = kl_dro_weights(l) held fixed.
    """
    n = losses.numel()
    return temperature * (torch.logsumexp(losses.reshape(-1) / temperature, dim=0) - math.log(n))


def kl_dro_objective(weights: torch.Tensor, losses: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum_i w_i l_i - r sum_i w_i log(n w_i) for any weights on the simplex (0 log 0 = 0)."""
    w, l = weights.double().reshape(-1), losses.double().reshape(-1)
    n = w.numel()
    ent = torch.where(w > 0, w * torch.log(n * w.clamp_min(1e-300)), torch.zeros_like(w))
    return (w * l).sum() - temperature * ent.sum()


def normalize_logits(logits: torch.Tensor, mode: str) -> torch.Tensor:
    """LDR logit normalisation: "softplus" (softplus(z) / mean_k softplus(z)), "l1" (z / (||z||_1 / K)),
    "softplus-l1" (softplus first, then l1) or "none"."""
    k = logits.shape[-1]
    if mode == "none":
        return logits
    if mode == "softplus":
        s = F.softplus(logits)
        return s / s.mean(dim=-1, keepdim=True)
    if mode in ("l1", "softplus-l1"):
        z = F.softplus(logits) if mode == "softplus-l1" else logits
        return z / (z.abs().sum(dim=-1, keepdim=True) / k)
    raise ValueError(f"unknown logit normalisation {mode!r}; valid: none, softplus, l1, softplus-l1")


def _margin_diffs(z: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    onehot = F.one_hot(target.long(), z.shape[-1]).to(z.dtype)
    z_y = (z * onehot).sum(-1, keepdim=True)
    return margin * (1 - onehot) + z - z_y


def ldr_kl(logits: torch.Tensor, target: torch.Tensor, lam: float | torch.Tensor = 10.0, margin: float = 0.1,
           normalize: str = "softplus") -> torch.Tensor:
    """Per-sample LDR-KL loss: lam * log( mean_k exp((c [k != y] + z_k - z_y) / lam) ).

    `lam` may be a scalar or a per-sample tensor (N,). lam -> 0 gives the Crammer-Singer
    loss max_k (c [k != y] + z_k - z_y); lam -> inf gives the mean margin. Logits are
    normalised first (`normalize`, reference default "softplus").
    """
    z = normalize_logits(logits, normalize)
    d = _margin_diffs(z, target, margin)
    lam_t = torch.as_tensor(lam, dtype=d.dtype, device=d.device)
    if lam_t.ndim == 1:
        lam_t = lam_t.unsqueeze(1)
    if bool((lam_t <= 0).any()):
        raise ValueError("the LDR temperature lambda must be > 0")
    a = d / lam_t
    m = a.max(dim=-1, keepdim=True).values.detach()
    out = lam_t * (torch.log(torch.exp(a - m).mean(dim=-1, keepdim=True)) + m)
    return out.squeeze(-1)


def aldr_lambda(z_normalized: torch.Tensor, lam_prev: torch.Tensor, lam0: float, alpha: float) -> torch.Tensor:
    """ALDR-KL's per-sample temperature update (no gradient).

    p = softmax(z / lam_prev) + 1e-5 (renormalised); KL = sum p log(K p);
    lam = lam0 - lam0 * KL / (alpha log K). alpha > 1 keeps lam >= lam0 (1 - 1/alpha) > 0.
    """
    z = z_normalized.detach()
    k = z.shape[-1]
    p = torch.softmax(z / lam_prev.reshape(-1, 1).to(z.dtype), dim=-1) + 1e-5
    p = p / p.sum(-1, keepdim=True)
    kl = (p * torch.log(k * p)).sum(-1)
    return lam0 - lam0 * kl / (alpha * math.log(k))


def aldr_kl(logits: torch.Tensor, target: torch.Tensor, lam_prev: torch.Tensor, lam0: float = 10.0,
            margin: float = 0.1, alpha: float = 2.0, normalize: str = "l1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ALDR-KL loss and the updated temperatures (loss, new_lam).

    loss_i = lam_i * log mean_k exp((c [k != y] + z_k - z_y) / lam_i) - (alpha log K / (2 lam0)) (lam_i - lam0)^2,
    with lam_i = aldr_lambda(z, lam_prev_i) held fixed (as the reference does).
    """
    if not alpha > 1:
        raise ValueError(f"ALDR-KL needs alpha > 1 (so that every lambda stays positive); got {alpha}")
    z = normalize_logits(logits, normalize)
    lam = aldr_lambda(z, lam_prev, lam0, alpha)
    k = z.shape[-1]
    loss = ldr_kl(z, target, lam, margin, normalize="none")
    loss = loss - alpha * math.log(k) / (2 * lam0) * (lam.to(loss.dtype) - lam0) ** 2
    return loss, lam
