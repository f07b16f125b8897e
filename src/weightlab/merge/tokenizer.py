"""tokenizer_source: merge models whose vocabularies differ (mergekit's `base` / `union` / a model's).

The output vocabulary is the base's tokenizer, the union of every input's (the base's tokens keep their
ids, the others are appended, added/special tokens last), or one model's tokenizer. Each input's embedding
and LM-head rows are then permuted into that vocabulary before the merge rule sees them; a token an input
lacks gets a stand-in row, as mergekit builds it: the one input that has the token gives its row; when
several have it, the base's row if the base has it, else the mean of theirs; no input: zeros.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ..errors import ConfigError

EMBED_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "word_embeddings.weight",
                  "embed_out.weight", "output.weight", "tok_embeddings.weight")


def _vocab_size(path) -> int | None:
    cfg = Path(path) / "config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text(encoding="utf-8"))
        return data.get("vocab_size") or (data.get("text_config") or {}).get("vocab_size")
    return None


def _load(path):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError("tokenizer_source needs transformers: pip install 'weightlab[hf]'") from None
    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the message names the folder
        raise ConfigError(f"tokenizer_source: cannot load the tokenizer of {path}: {e}") from None


def _usable(tok, path) -> dict[str, int]:
    """The tokens the model has embedding rows for (ids below its vocab_size)."""
    n = _vocab_size(path)
    return {t: i for t, i in tok.get_vocab().items() if n is None or i < n}


class VocabPlan:
    """The output tokenizer and, per input (by path), new token id -> its own id (-1: it lacks the token)."""

    def __init__(self, source: str, base: str | None, paths: list[str]):
        ref = base or paths[0]
        toks = {p: _load(p) for p in dict.fromkeys([ref, *paths])}
        if source == "base":
            out = toks[ref]
        elif source == "union":
            out = self._union(toks[ref], toks, ref)
        else:
            out = toks[source] if source in toks else _load(source)
        self.tokenizer = out
        self.vocab = out.get_vocab()
        self.size = len(self.vocab)
        self.base = base
        self.perm: dict[str, torch.Tensor] = {}
        for p, tok in toks.items():
            own = _usable(tok, p)
            ids = torch.full((self.size,), -1, dtype=torch.long)
            for t, new in self.vocab.items():
                if t in own:
                    ids[new] = own[t]
            self.perm[p] = ids

    @staticmethod
    def _union(base_tok, toks: dict, ref):
        with tempfile.TemporaryDirectory() as d:  # a copy: adding tokens must not touch the base's tokenizer
            base_tok.save_pretrained(d)
            out = _load(d)
        base_vocab = base_tok.get_vocab()
        plain, added = [], {}
        for p, tok in toks.items():
            special = tok.added_tokens_decoder
            names = {a.content for a in special.values()}
            for t, i in sorted(_usable(tok, p).items(), key=lambda x: x[1]):
                if t not in names and t not in base_vocab and t not in plain:
                    plain.append(t)
            for i, a in sorted(special.items()):
                if a.content not in added and i < (_vocab_size(p) or i + 1):
                    added[a.content] = a
        if plain:
            out.add_tokens(plain)
        new_added = [a for a in added.values() if a.content not in out.get_vocab()]
        if new_added:
            out.add_tokens(new_added)
        return out

    def is_embedding(self, name: str, shape) -> bool:
        return name.endswith(EMBED_SUFFIXES) and len(shape) == 2

    def permute(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each input's rows in the output vocabulary, stand-ins where it lacks a token."""
        keys = list(tensors)
        have = torch.stack([self.perm[k] >= 0 for k in keys])  # inputs x vocab
        count = have.sum(0)
        ref = next(iter(tensors.values()))
        fill = torch.zeros(self.size, ref.shape[1], dtype=torch.float64)
        for j, k in enumerate(keys):  # several have it and the base does not: their mean
            rows = self.perm[k].clamp(min=0)
            fill += tensors[k].double()[rows] * have[j].unsqueeze(1)
        fill /= count.clamp(min=1).unsqueeze(1)
        if self.base in tensors:  # the base has it: its row
            b = self.perm[self.base] >= 0
            fill[b] = tensors[self.base].double()[self.perm[self.base][b]]
        out = {}
        for k in keys:
            p = self.perm[k]
            rows = torch.where((p >= 0).unsqueeze(1), tensors[k].double()[p.clamp(min=0)], fill)
            out[k] = rows.to(tensors[k].dtype)
        return out

    def files(self) -> dict[str, str]:
        """The output tokenizer's files, to write beside the merged weights."""
        with tempfile.TemporaryDirectory() as d:
            self.tokenizer.save_pretrained(d)
            return {f.name: f.read_text(encoding="utf-8") for f in Path(d).iterdir() if f.is_file()}

    def config_edit(self, cfg: dict) -> dict:
        return {**cfg, "vocab_size": self.size}
