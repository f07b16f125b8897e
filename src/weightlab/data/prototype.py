"""Self-supervised prototype score ("Beyond neural scaling laws", Sorscher et al., 2022).

Embed every sample with any encoder (a self-supervised one in the paper; MiniLM for text
here), L2-normalise, k-means, score = cosine distance to the nearest centroid. High = far
from every prototype = hard / atypical. No labels are used.
"""
from __future__ import annotations

import time

import torch
from pydantic import Field

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from ..tensor.sample_scores import prototype_scores
from ._data import as_scoring_data

from .table import ScoreTable

PAPER = "Beyond neural scaling laws: beating power law scaling via data pruning (Sorscher et al., NeurIPS 2022)"


class PrototypeConfig(MethodConfig):
    """k defaults to the number of classes when labels are known (the spec's reading of the paper:
    k near the class count, results robust over a wide range), else 10."""

    k: int | None = Field(None, ge=1, description="clusters (default: number of classes, else 10)")
    n_init: int = Field(3, ge=1, description="k-means restarts (the lowest inertia wins)")
    max_iter: int = Field(100, ge=1)
    seed: int = 0


@register("data", "prototype", paper=PAPER, config=PrototypeConfig, regime=Regime.WHOLE_MODEL, kind="score", summary="cosine distance to the nearest k-means centroid of normalised embeddings (no labels)")
def prototype(data, cfg: PrototypeConfig | None = None, *, embeddings: torch.Tensor | None = None,
              show_progress: bool | None = None, device=None) -> ScoreTable:
    """Prototype scores. `data` is a dataset (name, CSV, zoo Dataset, ScoringData) or an (N, D) tensor
    of embeddings. Without `embeddings`, a dataset's own (standardised) features are embedded as they are.
    `device`: where the float64 k-means runs (None: the CPU; MPS has no float64, so 'auto' means the CPU
    there); the seeding draws stay on the CPU generator, so a seed picks the same starts everywhere.
    """
    from ..engine.placement import float64_device
    cfg = cfg or PrototypeConfig()
    t0 = time.perf_counter()
    if isinstance(data, torch.Tensor):
        emb, labels, name, names, num_classes, source = data, None, "embeddings", None, None, None
    else:
        d = as_scoring_data(data)
        emb = d.x if embeddings is None else embeddings
        labels, name, names, num_classes, source = d.y, d.name, d.label_names, d.num_classes, d.source_ids
    if emb.ndim != 2:
        raise ConfigError(f"embeddings must be a 2-D (samples, dims) tensor; got shape {tuple(emb.shape)}")
    if labels is not None and len(emb) != len(labels):
        raise ConfigError(f"{len(emb)} embeddings for {len(labels)} samples")
    if not torch.isfinite(emb).all():
        raise ConfigError("the embeddings hold NaN or Inf")
    k = cfg.k or num_classes or 10
    if k > len(emb):
        raise ConfigError(f"k={k} clusters for only {len(emb)} samples")
    dev = float64_device(device)
    scores, cluster = prototype_scores(emb.to(dev), k, n_init=cfg.n_init, max_iter=cfg.max_iter, seed=cfg.seed)
    scores, cluster = scores.cpu(), cluster.cpu()
    extra = {"cluster": cluster}
    if source:
        extra["source_id"] = source
    params = {**cfg.model_dump(), "k": k}
    return ScoreTable("prototype", scores, labels, params=params, dataset=name, label_names=names,
                      seconds=time.perf_counter() - t0, extra=extra)
