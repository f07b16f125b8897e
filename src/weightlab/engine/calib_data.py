"""Calibration and evaluation text: the zoo's Wikipedia splits, a text file or JSONL, tokenized."""
from __future__ import annotations

import torch

from ..errors import ConfigError


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
