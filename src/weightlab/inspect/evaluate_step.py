"""Recipe step: held-out perplexity of the model as the previous steps left it."""
from __future__ import annotations

from pydantic import Field

from ..registry import MethodConfig, Regime, register


class PerplexityConfig(MethodConfig):
    data: str = Field("wiki", description="wiki (its held-out split), a .txt or a .jsonl file")
    tokens: int = Field(16384, gt=1, description="tokens scored, in non-overlapping windows")
    seqlen: int = Field(512, gt=1)
    batch_size: int = Field(4, gt=0)


@register("inspect", "perplexity", kind="report", config=PerplexityConfig, regime=Regime.WHOLE_MODEL,
          paper="(evaluation)", summary="recipe step: held-out perplexity of a causal LM (windows of seqlen)")
def perplexity_step(source, cfg: PerplexityConfig, show_progress: bool | None = None) -> dict:
    from ..engine.evaluate import perplexity
    from ..engine.source import load_model_from
    from ..io.refs import load_text

    model, tok = load_model_from(source)
    return perplexity(model, tok, load_text(cfg.data, "heldout"), seqlen=cfg.seqlen, max_tokens=cfg.tokens,
                      batch_size=cfg.batch_size, show_progress=show_progress)
