"""Evaluation on real data: held-out perplexity of causal LMs."""
from __future__ import annotations

import math
import time

import torch

from .progress import progress


@torch.no_grad()
def perplexity(model, tokenizer, text: str, *, seqlen: int = 512, max_tokens: int = 16384,
               batch_size: int = 4, show_progress: bool | None = None) -> dict:
    """Perplexity over the first ``max_tokens`` tokens cut into non-overlapping windows.

    Each window of ``seqlen`` tokens is scored on its own (seqlen-1 predicted tokens), the
    protocol of the project's baselines: 16,384 tokens -> 32 windows -> 16,352 scored tokens.
    """
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:max_tokens]
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    batches = list(windows.split(batch_size))
    for batch in progress(batches, "perplexity", enabled=show_progress):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                                 reduction="sum")
        nll += loss.item()
        count += targets.numel()
    model.train(was_training)
    return {"perplexity": math.exp(nll / count), "tokens": count, "windows": n_windows, "seqlen": seqlen,
            "seconds": round(time.perf_counter() - t0, 2)}


@torch.no_grad()
def embedding_similarity(model, reference, tokenizer, sentences: list[str], batch_size: int = 32) -> dict:
    """Mean cosine between mean-pooled, L2-normalised embeddings of ``model`` and ``reference``."""

    def embed(m, batch):
        enc = tokenizer(batch, padding=True, truncation=True, return_tensors="pt")
        out = m(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
        e = (out * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(e.float(), dim=-1)

    cos = []
    for i in range(0, len(sentences), batch_size):
        b = sentences[i:i + batch_size]
        cos.append((embed(model, b) * embed(reference, b)).sum(-1))
    c = torch.cat(cos)
    return {"cosine_mean": float(c.mean()), "cosine_min": float(c.min()), "sentences": len(sentences)}
