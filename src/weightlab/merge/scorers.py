"""Held-out scorers for greedy soups: higher is better.

- accuracy_scorer: classification accuracy of a module on (x, y).
- lm_scorer: minus the mean next-token loss of a causal LM on text (fixed windows).
- scorer_from_config: builds one of those from a merge config's `scorer:` mapping.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict

from ..errors import ConfigError

StateDict = dict[str, torch.Tensor]


def accuracy_scorer(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> Callable:
    work = copy.deepcopy(model).eval()

    @torch.no_grad()
    def score(sd: StateDict) -> float:
        work.load_state_dict(sd)
        correct = sum(int((work(xb).argmax(-1) == yb).sum()) for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
        return correct / len(y)

    return score


def lm_scorer(model, tokenizer, text: str, seqlen: int = 512, max_tokens: int = 4096) -> Callable:
    from ..engine.evaluate import perplexity

    def score(sd: StateDict) -> float:
        model.load_state_dict(sd, strict=False)
        return -math.log(perplexity(model, tokenizer, text, seqlen=seqlen, max_tokens=max_tokens,
                                    show_progress=False)["perplexity"])

    return score


class ScorerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["accuracy", "lm-loss"]
    dataset: str | None = None  # accuracy: a zoo dataset name (digits, mnist1d, wine, breast_cancer)
    text: str = "zoo:wiki-heldout"  # lm-loss: zoo:wiki-heldout, zoo:wiki-calib or a text file
    seqlen: int = 512
    max_tokens: int = 4096


def scorer_from_config(cfg: ScorerConfig, reference: Path) -> Callable:
    """Build the scorer; ``reference`` is a model folder whose config tells the architecture."""
    import json

    config = json.loads((reference / "config.json").read_text()) if (reference / "config.json").is_file() else {}
    if cfg.type == "accuracy":
        if config.get("model_type") != "weightlab-zoo-mlp":
            raise ConfigError("the accuracy scorer from a config works on the zoo's classifier folders "
                              "(weightlab zoo export); for other models call greedy_soup() with accuracy_scorer()")
        from ..zoo import MLP, load_dataset

        data = load_dataset(cfg.dataset or config.get("dataset", "digits"))
        from ..io.reader import open_checkpoint

        sd = open_checkpoint(reference).state_dict()
        hidden = tuple(sd[k].shape[0] for k in sd if k.endswith("weight"))[:-1]
        model = MLP(data.num_features, hidden, data.num_classes)
        return accuracy_scorer(model, data.x_test, data.y_test)
    from ..io.hf import load_causal_lm

    model, tok = load_causal_lm(reference)
    if cfg.text.startswith("zoo:wiki-"):
        from ..zoo import wiki_text

        text = wiki_text(cfg.text.removeprefix("zoo:wiki-"))
    else:
        p = Path(cfg.text)
        if not p.is_file():
            raise ConfigError(f"scorer text file '{p}' does not exist")
        text = p.read_text(encoding="utf-8")
    return lm_scorer(model, tok, text, cfg.seqlen, cfg.max_tokens)
