"""Recipe step: the quality of the model as the previous steps left it.

perplexity (causal LMs, held-out text), similarity (encoders: mean cosine of sentence embeddings
against a reference model) or accuracy (the zoo's classifiers, on their test split); ``auto``
picks by the model's kind.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register


class EvaluateConfig(MethodConfig):
    metric: Literal["auto", "perplexity", "similarity", "accuracy"] = "auto"
    data: str = Field("wiki", description="wiki (its held-out split), a .txt or a .jsonl file")
    tokens: int = Field(16384, gt=1, description="perplexity: tokens scored, in non-overlapping windows")
    seqlen: int = Field(512, gt=1)
    batch_size: int = Field(4, gt=0)
    reference: str | None = Field(None, description="similarity: the model to compare embeddings with")


def _evaluate(source, cfg: EvaluateConfig, metric: str, show_progress) -> dict:
    from ..engine.evaluate import (eval_sentences, embedding_similarity, load_with_evaluator, model_kind,
                                   perplexity)
    from ..engine.source import load_model_from, step_folder
    from ..io.hf import load_encoder
    from ..io.reader import open_checkpoint
    from ..io.refs import load_text, resolve_model

    kind = model_kind(source.config or {})
    if metric == "auto":
        metric = {"causal-lm": "perplexity", "encoder": "similarity", "zoo-mlp": "accuracy"}[kind]
    want = {"perplexity": "causal-lm", "similarity": "encoder", "accuracy": "zoo-mlp"}[metric]
    if kind != want:
        raise ConfigError(f"metric {metric} is for a {want} model; this one is a {kind}")
    if metric == "perplexity":
        model, tok = load_model_from(source)
        r = perplexity(model, tok, load_text(cfg.data, "heldout"), seqlen=cfg.seqlen, max_tokens=cfg.tokens,
                       batch_size=cfg.batch_size, show_progress=show_progress)
        return {"metric": metric, **r}
    path = step_folder(source)
    if metric == "accuracy":
        with open_checkpoint(path) as ck:
            model, _, ev = load_with_evaluator(kind, path, ck)
        return {"metric": metric, **ev(model)}
    if cfg.reference is None:
        raise ConfigError("metric similarity compares embeddings with a reference model: set 'reference'")
    model, tok = load_encoder(path)
    ref, _ = load_encoder(resolve_model(cfg.reference))
    return {"metric": metric, "reference": cfg.reference,
            **embedding_similarity(model, ref, tok, eval_sentences(load_text(cfg.data, "heldout")))}


@register("inspect", "evaluate", kind="report", config=EvaluateConfig, regime=Regime.WHOLE_MODEL,
          paper="(evaluation)", summary="recipe step: perplexity (causal LMs), embedding similarity to a reference "
                                        "(encoders) or test accuracy (zoo classifiers)")
def evaluate_step(source, cfg: EvaluateConfig, show_progress: bool | None = None) -> dict:
    return _evaluate(source, cfg, cfg.metric, show_progress)


@register("inspect", "perplexity", kind="report", config=EvaluateConfig, regime=Regime.WHOLE_MODEL,
          paper="(evaluation)", summary="recipe step: held-out perplexity of a causal LM (windows of seqlen)")
def perplexity_step(source, cfg: EvaluateConfig, show_progress: bool | None = None) -> dict:
    return _evaluate(source, cfg, "perplexity", show_progress)
