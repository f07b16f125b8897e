"""Self-supervised prototype score ("Beyond neural scaling laws", Sorscher et al., 2022).

Embed every sample with a self-supervised encoder, L2-normalise, k-means, score = cosine
distance to the nearest centroid. High = far from every prototype = hard / atypical; the paper
keeps the hardest when data is abundant and the easiest when it is scarce. No labels are used.

The encoder is what makes it the paper's metric (SwAV on ImageNet there):
- numeric data (zoo datasets, CSV): a SimCLR encoder trained on the samples themselves
  (`ssl_encoder.py`, seconds on a CPU);
- texts (a list of strings, or a .txt file with one sample per line): all-MiniLM-L6-v2,
  mean-pooled (the zoo's offline copy);
- embeddings you computed elsewhere: pass them as `data` (an (N, D) tensor) or `embeddings=`.
`encoder="raw"` clusters the input features as they are. That is an ablation, not the method:
the score table records it as encoder "raw".
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from ..tensor.sample_scores import prototype_scores
from ._data import as_scoring_data
from .ssl_encoder import SHAPES, SSLEncoderConfig, minilm_embeddings, train_ssl_encoder
from .table import ScoreTable

PAPER = "Beyond neural scaling laws: beating power law scaling via data pruning (Sorscher et al., NeurIPS 2022)"
ENCODERS = ("auto", "ssl", "minilm", "raw")


class PrototypeConfig(MethodConfig):
    """k defaults to the number of classes when labels are known (the paper clusters ImageNet with
    k near its class count and reports the metric robust over a wide range of k), else 10."""

    k: int | None = Field(None, ge=1, description="clusters (default: number of classes, else 10)")
    encoder: Literal["auto", "ssl", "minilm", "raw"] = Field(
        "auto", description="auto: MiniLM for texts, a SimCLR encoder trained on the samples for numeric data; "
                            "raw: the input features themselves (an ablation, not the paper's method)")
    ssl: SSLEncoderConfig = Field(default_factory=SSLEncoderConfig,
                                  description="the SimCLR encoder (its seed is taken from `seed`)")
    n_init: int = Field(3, ge=1, description="k-means restarts (the lowest inertia wins)")
    max_iter: int = Field(100, ge=1)
    seed: int = Field(0, description="seeds the encoder's training and the k-means starts")


def read_texts(path: str | os.PathLike) -> list[str]:
    """One sample per non-empty line of a UTF-8 text file."""
    p = Path(path)
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a UTF-8 text file") from None
    texts = [ln for ln in lines if ln]
    if not texts:
        raise ConfigError(f"{p}: no text lines to score")
    return texts


def _is_texts(data) -> bool:
    return isinstance(data, (list, tuple)) and len(data) > 0 and all(isinstance(t, str) for t in data)


def _embed(data, cfg: PrototypeConfig, embeddings):
    """(embeddings, labels, name, label names, classes, source ids, encoder used)."""
    enc = cfg.encoder
    if isinstance(data, (str, os.PathLike)) and Path(data).suffix.lower() == ".txt" and Path(data).is_file():
        data = read_texts(data)
    if _is_texts(data):
        if enc not in ("auto", "minilm"):
            raise ConfigError(f"encoder={enc!r} needs numeric features; texts are embedded with 'minilm'")
        emb = embeddings if embeddings is not None else minilm_embeddings(list(data))
        return emb, None, "texts", None, None, None, "given" if embeddings is not None else "minilm"
    if isinstance(data, torch.Tensor):
        x, labels, name, names, num_classes, source = data, None, "embeddings", None, None, None
        given = enc == "auto"  # a bare tensor is taken to be embeddings already
    else:
        d = as_scoring_data(data)
        x, labels, name, names, num_classes, source = d.x, d.y, d.name, d.label_names, d.num_classes, d.source_ids
        given = False
    if embeddings is not None or given:
        emb, used = (x if embeddings is None else embeddings), "given"
    elif enc == "minilm":
        raise ConfigError("encoder='minilm' embeds texts: give a list of strings or a .txt file (one per line)")
    elif enc == "raw":
        emb, used = x, "raw"
    else:
        if x.ndim != 2:
            raise ConfigError(f"features must be a 2-D (samples, features) tensor; got shape {tuple(x.shape)}")
        ssl_cfg = cfg.ssl.model_copy(update={"seed": cfg.seed})
        # trained on the CPU whatever `device` says: a tiny MLP, and the scores then do not depend on
        # a GPU's float32 rounding over hundreds of steps (the k-means is the part that scales with N)
        model = train_ssl_encoder(x, ssl_cfg, shape=SHAPES.get(name))
        emb, used = model.embed(x.float()), "ssl"
    return emb, labels, name, names, num_classes, source, used


@register("data", "prototype", paper=PAPER, config=PrototypeConfig, regime=Regime.WHOLE_MODEL, kind="score",
          summary="cosine distance to the nearest k-means centroid of self-supervised embeddings (no labels)")
def prototype(data, cfg: PrototypeConfig | None = None, *, embeddings: torch.Tensor | None = None,
              show_progress: bool | None = None, device=None) -> ScoreTable:
    """Prototype scores. `data`: a dataset (name, CSV, zoo Dataset, ScoringData), texts (list of
    strings or a .txt file), or an (N, D) tensor of embeddings. `embeddings` overrides the encoder.
    `device`: where the float64 k-means runs (None: the CPU; MPS has no float64, so 'auto' means the
    CPU there); the SSL encoder always trains on the CPU and the seeding draws stay on the CPU
    generator, so a seed gives the same scores everywhere up to k-means rounding.
    """
    from ..engine.placement import float64_device
    cfg = cfg or PrototypeConfig()
    t0 = time.perf_counter()
    emb, labels, name, names, num_classes, source, used = _embed(data, cfg, embeddings)
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
    params = {**cfg.model_dump(), "k": k, "encoder": used, "embedding_dim": int(emb.shape[1])}
    if used != "ssl":
        params.pop("ssl")  # no encoder was trained: its settings would only mislead
    return ScoreTable("prototype", scores, labels, params=params, dataset=name, label_names=names,
                      seconds=time.perf_counter() - t0, extra=extra)
