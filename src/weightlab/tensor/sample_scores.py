"""Per-sample difficulty math: EL2N, forgetting events, ranks, AUROC, k-means prototypes.

Pure functions on tensors (no models, no files). The data family (weightlab.data) trains
the models and calls these.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def el2n(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Error L2-norm per row: ||softmax(logits) - onehot(label)||_2 (Paul et al., 2021), in float64."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"el2n expects logits (N, K) and labels (N,); got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    p = torch.softmax(logits.detach().double(), dim=1)
    return torch.linalg.vector_norm(p - F.one_hot(labels.long(), logits.shape[1]).double(), dim=1)


def forgetting_update(prev_correct: torch.Tensor, forgets: torch.Tensor, ever_correct: torch.Tensor,
                      ids: torch.Tensor, correct: torch.Tensor) -> None:
    """One minibatch presentation of the samples `ids`, in place.

    A forgetting event is correct -> incorrect between two presentations of a sample
    (Toneva et al., 2019, as counted in the Data Diet reference). `prev_correct` starts
    all False, so a first presentation is never a forgetting event.
    """
    ids = ids.long()
    correct = correct.bool()
    forgets[ids] += (prev_correct[ids] & ~correct).to(forgets.dtype)
    prev_correct[ids] = correct
    ever_correct[ids] |= correct


def forgetting_scores(forgets: torch.Tensor, ever_correct: torch.Tensor) -> torch.Tensor:
    """Forgetting counts as float64, +inf for samples never classified correctly."""
    s = forgets.double().clone()
    s[~ever_correct] = math.inf
    return s


def rank_descending(scores: torch.Tensor) -> torch.Tensor:
    """1-based rank of every score, 1 = highest; ties broken by index (stable). NaN ranks last."""
    s = scores.detach().double().clone()
    s[torch.isnan(s)] = -math.inf
    order = torch.sort(-s, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(s) + 1)
    return rank


def auroc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` for telling `positives` from the rest.

    The Mann-Whitney statistic with average ranks for ties (so a constant score gives
    exactly 0.5); +inf scores are fine. NaN if either class is empty.
    """
    s = scores.detach().double().reshape(-1)
    pos = positives.reshape(-1).bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    sorted_s, order = torch.sort(s)
    # average rank (1-based) of each run of equal values
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg = (ends - (counts.double() - 1) / 2)[inverse]
    ranks = torch.empty_like(avg)
    ranks[order] = avg
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm (all-zero rows stay zero)."""
    x = x.double()
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(eps)


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than k: repeat one
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            # the generator is a CPU one (same draws on every device), so the weights go to the CPU
            idx = int(torch.multinomial((d2 / total).cpu(), 1, generator=gen))
        centers.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    return torch.stack(centers)


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return ((x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)).clamp_min(0)


def kmeans(x: torch.Tensor, k: int, *, n_init: int = 3, max_iter: int = 100, tol: float = 1e-8,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Lloyd's k-means with k-means++ seeding, best of `n_init` starts (lowest inertia).

    Returns (centroids (k, D), assignment (N,), inertia), all in float64. Deterministic for a
    seed. An empty cluster is re-seeded at the point farthest from its centroid.
    """
    x = x.detach().double()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points ({n}); got k={k}")
    gen = torch.Generator().manual_seed(int(seed))
    best = None
    for _ in range(max(1, n_init)):
        c = _kmeans_pp(x, k, gen)
        prev = math.inf
        for _ in range(max_iter):
            d = _sq_dists(x, c)
            dist, assign = d.min(1)
            inertia = float(dist.sum())
            sums = torch.zeros_like(c).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).double()
            empty = counts == 0
            c = sums / counts.clamp_min(1).unsqueeze(1)
            if empty.any():
                far = torch.argsort(dist, descending=True)[: int(empty.sum())]
                c[empty] = x[far]
            if prev - inertia <= tol * max(prev, 1e-300) and not empty.any():
                break
            prev = inertia
        d = _sq_dists(x, c)
        dist, assign = d.min(1)
        inertia = float(dist.sum())
        if best is None or inertia < best[2]:
            best = (c, assign, inertia)
    return best


def cosine_distance_to_nearest(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - max_j cos(x_i, c_j), argmax_j) for every row of x, in float64."""
    sims = l2_normalize(x) @ l2_normalize(centroids).T
    best, idx = sims.max(1)
    return (1 - best).clamp_min(0), idx


def prototype_scores(embeddings: torch.Tensor, k: int, *, n_init: int = 3, max_iter: int = 100,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-supervised prototype difficulty (Sorscher et al., 2022).

    L2-normalise the embeddings, run k-means, score = cosine distance to the nearest
    centroid (high = atypical / hard). Returns (scores, cluster index). Invariant to the
    scale of each embedding row.
    """
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (N, D); got shape {tuple(embeddings.shape)}")
    z = l2_normalize(embeddings)
    centroids, _, _ = kmeans(z, k, n_init=n_init, max_iter=max_iter, seed=seed)
    return cosine_distance_to_nearest(z, centroids)
