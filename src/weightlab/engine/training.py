"""Adapter fine-tuning of causal LMs: ``tune(model, tokenizer, method, data, ...)``.

Data: plain text (``wiki``, a .txt file, or a .jsonl with "text") cut into random token windows
(loss on every token), or a .jsonl of prompt/response pairs (loss on the response tokens only).
Held-out loss: the zoo's held-out Wikipedia split for ``wiki``, else the last 10% of the data.
The loop: loss.backward(); clip (max norm 1.0); ``adapt.backward_regularizers`` (SORSA's term
after clipping, unclipped); optimizer step (AdamW, or the method's own optimizer); cosine
schedule with linear warmup. Checkpoints (adapter + optimizer + step) are written atomically to
OUT/checkpoint every ``save_every`` steps; a second run with the same OUT resumes from it.
At the end OUT/adapter (weightlab adapter folder), OUT/merged (the merged HF model, when
``merged=True``) and OUT/history.json are written. Any other loop works with attach/merge.
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TextData:
    """Random windows of a token stream (loss on all tokens)."""

    def __init__(self, ids: torch.Tensor, seqlen: int):
        if ids.numel() < seqlen + 1:
            raise ConfigError(f"the training text has {ids.numel()} tokens, fewer than one window of {seqlen}")
        self.ids, self.seqlen = ids, seqlen

    def batch(self, n: int, g: torch.Generator):
        starts = torch.randint(0, self.ids.numel() - self.seqlen, (n,), generator=g)
        x = torch.stack([self.ids[s:s + self.seqlen] for s in starts.tolist()])
        return {"input_ids": x, "labels": x.clone()}

    def eval_batches(self, n: int, bs: int):
        k = min(n * bs, self.ids.numel() // self.seqlen)
        x = self.ids[: k * self.seqlen].view(k, self.seqlen)
        return [{"input_ids": x[i:i + bs], "labels": x[i:i + bs].clone()} for i in range(0, k, bs)]


class PairData:
    """Prompt/response pairs: labels are -100 on the prompt and padding."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], seqlen: int, pad_id: int):
        self.ex, self.seqlen, self.pad = examples, seqlen, pad_id

    def _collate(self, items):
        rows = []
        for p, r in items:
            ids = (p + r)[: self.seqlen]
            lab = ([-100] * len(p) + r)[: self.seqlen]
            rows.append((ids, lab))
        L = max(len(i) for i, _ in rows)
        x = torch.full((len(rows), L), self.pad, dtype=torch.long)
        y = torch.full((len(rows), L), -100, dtype=torch.long)
        am = torch.zeros((len(rows), L), dtype=torch.long)
        for k, (i, lab) in enumerate(rows):
            x[k, :len(i)] = torch.tensor(i)
            y[k, :len(lab)] = torch.tensor(lab)
            am[k, :len(i)] = 1
        return {"input_ids": x, "labels": y, "attention_mask": am}

    def batch(self, n: int, g: torch.Generator):
        idx = torch.randint(0, len(self.ex), (n,), generator=g).tolist()
        return self._collate([self.ex[i] for i in idx])

    def eval_batches(self, n: int, bs: int):
        items = self.ex[: n * bs]
        return [self._collate(items[i:i + bs]) for i in range(0, len(items), bs)]


def load_data(source: str, tokenizer, seqlen: int):
    """(train, heldout) datasets from 'wiki', a .txt, or a .jsonl (text, or prompt/response pairs)."""
    from .calib_data import load_text

    p = Path(source)
    if source not in ("wiki", "zoo:wiki") and p.suffix == ".jsonl" and p.is_file():
        rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        if rows and all(isinstance(r, dict) and "prompt" in r and "response" in r for r in rows):
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            ex = [(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"],
                   tokenizer(r["response"], add_special_tokens=False)["input_ids"] + eos) for r in rows]
            if len(ex) < 2:
                raise ConfigError(f"{source}: need at least 2 prompt/response pairs (one is held out)")
            k = max(1, len(ex) // 10)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
            return PairData(ex[:-k], seqlen, pad), PairData(ex[-k:], seqlen, pad)
    if source in ("wiki", "zoo:wiki"):
        tr, ho = load_text("wiki", "calib"), load_text("wiki", "heldout")
    else:
        text = load_text(source, "calib")
        cut = int(len(text) * 0.9)
        tr, ho = text[:cut], text[cut:]
    enc = lambda t: tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"][0]  # noqa: E731
    return TextData(enc(tr), seqlen), TextData(enc(ho), seqlen)


@torch.no_grad()
def heldout_loss(model, batches, device) -> float:
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        cnt = int((b["labels"][:, 1:] != -100).sum())
        tot += float(model(**b).loss) * cnt
        n += cnt
    model.train(was)
    return tot / max(n, 1)


def _lr_at(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))


def tune(model, tokenizer, method: str = "lora", data: str = "wiki", *, rank: int | None = 16,
         targets=None, steps: int = 100, lr: float = 2e-4, batch_size: int = 4, seqlen: int = 256,
         eval_every: int | None = None, eval_batches: int = 4, out=None, resume: bool = True,
         save_every: int | None = None, seed: int = 0, max_grad_norm: float = 1.0, warmup: float = 0.03,
         weight_decay: float = 0.0, merged: bool = True, progress: bool | None = None,
         on_eval: Callable[[int, float], None] | None = None, method_config: dict | None = None,
         train_data=None, heldout_data=None) -> dict:
    """Fine-tune ``model`` with adapter ``method``; returns {"history": [...], "heldout_before", "heldout_after", ...}."""
    from .. import adapt
    from .progress import progress as pbar

    torch.manual_seed(seed)
    random.seed(seed)
    device = next(model.parameters()).device
    tr, ho = (train_data, heldout_data) if train_data is not None else load_data(data, tokenizer, seqlen)
    eval_set = ho.eval_batches(eval_batches, batch_size)
    out = Path(out) if out is not None else None
    ckpt = out / "checkpoint" if out is not None else None
    cfg = dict(method_config or {})
    if rank is not None:
        cfg.setdefault("r", rank)
    start, history = 0, []
    g = torch.Generator().manual_seed(seed)
    if ckpt is not None and resume and (ckpt / "trainer.pt").is_file():
        adapt.load(model, ckpt / "adapter")
        state = torch.load(ckpt / "trainer.pt", weights_only=False)
        start, history = state["step"], state["history"]
        g.set_state(state["generator"])
        opt = adapt.make_optimizer(model, lr, weight_decay)
        opt.load_state_dict(state["optimizer"])
    else:
        adapt.attach(model, method, targets=targets or _default_targets(model), **cfg)
        opt = adapt.make_optimizer(model, lr, weight_decay)
    params = adapt.trainable_parameters(model)
    n_train = sum(p.numel() for p in params)
    eval_every = eval_every or max(1, steps // 5)
    save_every = save_every or max(1, steps // 4)
    wsteps = max(1, int(warmup * steps))
    before = heldout_loss(model, eval_set, device) if start == 0 else history[0]["heldout"]
    if start == 0:
        history.append({"step": 0, "heldout": before})
        if on_eval:
            on_eval(0, before)
    model.train()
    t0 = time.perf_counter()
    train_losses = []
    for step in pbar(range(start, steps), f"tune {method}", total=steps - start, enabled=progress):
        for grp in opt.param_groups:
            grp["lr"] = lr * _lr_at(step, steps, wsteps)
        b = {k: v.to(device) for k, v in tr.batch(batch_size, g).items()}
        loss = model(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        adapt.backward_regularizers(model)  # after clipping (SORSA), unclipped
        opt.step()
        adapt.step_hooks(model, step + 1, steps)  # schedules and re-selection (PST, SaRA, DSEE)
        train_losses.append(float(loss.detach()))
        s = step + 1
        if s % eval_every == 0 or s == steps:
            h = heldout_loss(model, eval_set, device)
            history.append({"step": s, "heldout": h, "train": sum(train_losses[-eval_every:]) /
                            len(train_losses[-eval_every:])})
            if on_eval:
                on_eval(s, h)
        if ckpt is not None and (s % save_every == 0) and s < steps:
            _save_checkpoint(model, opt, s, history, g, ckpt)
    seconds = time.perf_counter() - t0
    model.eval()
    result = {"method": method, "steps": steps, "trainable": n_train, "heldout_before": before,
              "heldout_after": history[-1]["heldout"], "history": history, "seconds": round(seconds, 2),
              "resumed_from": start}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        adapt.save(model, out / "adapter", force=True)
        (out / "history.json").write_text(json.dumps(result, indent=1))
        if merged:
            _save_merged(model, tokenizer, out / "merged")
        if ckpt.exists():
            import shutil

            shutil.rmtree(ckpt, ignore_errors=True)
    return result


def _default_targets(model):
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    t = [x for x in DEFAULT_TARGETS if x in names]
    return t or "all-linear"


def _save_checkpoint(model, opt, step, history, g, ckpt: Path) -> None:
    from .. import adapt
    from ..io.atomic import AtomicFolder

    with AtomicFolder(ckpt, force=True) as tmp:
        adapt.save(model, tmp / "adapter")
        torch.save({"step": step, "history": history, "optimizer": opt.state_dict(), "generator": g.get_state()},
                   tmp / "trainer.pt")


def _save_merged(model, tokenizer, path: Path) -> None:
    import copy

    from .. import adapt
    from ..io.atomic import AtomicFolder

    m = copy.deepcopy(model)
    adapt.merge(m)
    with AtomicFolder(path, force=True) as tmp:
        m.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
