"""Calibration and evaluation text: the zoo's Wikipedia splits, a text file or JSONL, tokenized."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ConfigError


def load_text(source: str, split: str = "calib") -> str:
    """'wiki' (the zoo's Wikipedia; split calib or heldout), a .txt file, or a .jsonl file with a 'text' field."""
    if source in ("wiki", "zoo:wiki"):
        from ..zoo import wiki_text

        return wiki_text("calib" if split == "calib" else "heldout")
    p = Path(source)
    if not p.is_file():
        raise ConfigError(f"calibration/evaluation data '{source}' is neither 'wiki' nor an existing file")
    if p.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ConfigError(f"{p}:{i}: each JSONL line needs a string field 'text'")
            texts.append(obj["text"])
        return "\n\n".join(texts)
    return p.read_text(encoding="utf-8")


def token_windows(tokenizer, text: str, nsamples: int, seqlen: int, seed: int = 0,
                  sampling: str = "random") -> torch.Tensor:
    """(nsamples, seqlen) token ids: random windows (seeded) or the first consecutive windows."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < seqlen + 1:
        raise ConfigError(f"the calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if sampling == "consecutive":
        n = min(nsamples, ids.numel() // seqlen)
        if n < nsamples:
            raise ConfigError(f"the calibration text holds only {n} windows of {seqlen} tokens; lower --nsamples")
        return ids[: n * seqlen].view(n, seqlen)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
