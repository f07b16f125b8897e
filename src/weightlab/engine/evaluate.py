"""Evaluation on real data: held-out perplexity of causal LMs."""
from __future__ import annotations

import copy
import math
import re
import time

import torch

from ..io.refs import load_text
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


class _Replay(torch.nn.Module):
    """Stands in for a block in the final pass: the first returns the cached last hidden state, the rest pass it on."""

    def __init__(self, outputs: list | None, as_tuple: bool):
        super().__init__()
        self.outputs, self.as_tuple, self.i = outputs, as_tuple, 0

    def forward(self, hidden_states=None, *args, **kwargs):
        if self.outputs is not None:
            hidden_states = self.outputs[self.i].to(hidden_states.device)
            self.i += 1
        return (hidden_states,) if self.as_tuple else hidden_states


@torch.no_grad()
def streamed_perplexity(path, tokenizer, text: str, *, seqlen: int = 512, max_tokens: int = 16384,
                        batch_size: int = 4, device="cpu", dtype=torch.float32,
                        show_progress: bool | None = None) -> dict:
    """``perplexity`` of a checkpoint that is never loaded whole: windows pass block by block.

    The same windows and scoring as ``perplexity``; the blocks are onloaded one at a time
    (engine/onload.py), and the model's own tail (final norm, head, any logit scaling) runs on the
    cached last hidden states, so no architecture's output maths is re-implemented here.
    """
    from .calibration import _block_output, _with_hidden, capture_inputs, to_device
    from .onload import OnloadedModel

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:max_tokens]
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    t0 = time.perf_counter()
    om = OnloadedModel(path, "causal-lm", device=device, dtype=dtype)
    batches = [{"input_ids": b, "use_cache": False} for b in windows.split(batch_size)]
    cap = capture_inputs(om.model, om.blocks[0], batches)
    inputs = list(zip(cap.args, cap.kwargs))
    del cap
    dev = torch.device(device)
    as_tuple = False
    for i in progress(range(len(om.blocks)), "perplexity (blocks)", enabled=show_progress):
        blk = om.load_block(i)
        for j, (a, k) in enumerate(inputs):
            out = blk(*to_device(a, dev), **to_device(k, dev))
            as_tuple = isinstance(out, (tuple, list))
            inputs[j] = _with_hidden(a, k, _block_output(out))
        om.free_block(i)
    last = [(a[0] if a else k["hidden_states"]) for a, k in inputs]
    del inputs
    parent = om.model.get_submodule(om.blocks_name.rpartition(".")[0]) if "." in om.blocks_name else om.model
    attr = om.blocks_name.rpartition(".")[2]
    first = _Replay([], as_tuple)
    setattr(parent, attr, torch.nn.ModuleList([first] + [_Replay(None, as_tuple) for _ in range(len(om.blocks) - 1)]))
    om.load_head(dev)
    om.model.to(dev)  # no block weights are left: only the embeddings, the final norm and the head move
    nll, count = 0.0, 0
    try:
        for j, b in enumerate(batches):
            first.outputs, first.i = [last[j]], 0
            batch = b["input_ids"].to(dev)
            logits = om.model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                                     reduction="sum").item()
            count += targets.numel()
    finally:
        om.close()
    return {"perplexity": math.exp(nll / count), "tokens": count, "windows": n_windows, "seqlen": seqlen,
            "seconds": round(time.perf_counter() - t0, 2)}


def model_kind(config: dict) -> str:
    """causal-lm, encoder or zoo-mlp, from a checkpoint's config."""
    arch = (config.get("architectures") or [""])[0]
    if config.get("model_type") == "weightlab-zoo-mlp":
        return "zoo-mlp"
    return "causal-lm" if arch.endswith("ForCausalLM") else "encoder"


def eval_sentences(text: str, n: int = 200) -> list[str]:
    out = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 5]
    return out[:n]


def load_with_evaluator(kind, src, ck, eval_data="wiki", eval_tokens=16384, no_eval=False, dtype=None):
    """(model, tokenizer, evaluate) for a checkpoint of ``kind``; evaluate(model) -> quality dict, or None.

    Causal LMs: held-out perplexity; encoders: embedding similarity to the model as loaded; zoo MLPs:
    test accuracy."""
    if kind == "zoo-mlp":
        from ..zoo import MLP, accuracy, load_dataset

        data = load_dataset((ck.config or {}).get("dataset", "digits"))
        sd = ck.state_dict()
        hidden = tuple(sd[k].shape[0] for k in sd if k.endswith("weight"))[:-1]
        model = MLP(data.num_features, hidden, data.num_classes)
        model.load_state_dict(sd)
        return model.eval(), None, None if no_eval else (
            lambda m: {"accuracy": round(accuracy(m, data.x_test, data.y_test), 4)})
    kw = {"dtype": dtype} if dtype else {}
    if kind == "causal-lm":
        from ..engine.evaluate import perplexity
        from ..io.hf import load_causal_lm

        model, tok = load_causal_lm(src, **kw)
        text = None if no_eval else load_text(eval_data, "heldout")

        def ev(m):
            r = perplexity(m, tok, text, max_tokens=eval_tokens)
            return {"perplexity": round(r["perplexity"], 3), "tokens": r["tokens"]}

        return model, tok, None if no_eval else ev
    from ..engine.evaluate import embedding_similarity
    from ..io.hf import load_encoder

    model, tok = load_encoder(src, **kw)
    dense = copy.deepcopy(model)
    sentences = eval_sentences(load_text(eval_data, "heldout")) if not no_eval else []
    return model, tok, None if no_eval else (lambda m: embedding_similarity(m, dense, tok, sentences))
