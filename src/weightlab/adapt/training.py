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

``loss_weighting`` names a data-family reweighter or robust loss (loss-reweight / linupper /
quadratic / extremes, dro, ldr-kl, aldr-kl; see ``sample_loss``) that replaces the plain mean.

Multi-process: under ``accelerate launch`` (or with ``accelerator=Accelerator(...)``) the model and
optimizer go through ``accelerator.prepare``; every process draws the same global batch of
``batch_size * num_processes`` and trains on its slice, so N processes see what one process with
N times the batch sees; held-out losses are summed over processes; only the main process writes.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError, MissingDependencyError
from ..registry import get_method

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TextData:
    """Random windows of a token stream (loss on all tokens). A sample id is a token's position in the stream."""

    def __init__(self, ids: torch.Tensor, seqlen: int):
        if ids.numel() < seqlen + 1:
            raise ConfigError(f"the training text has {ids.numel()} tokens, fewer than one window of {seqlen}")
        self.ids, self.seqlen = ids, seqlen
        self.num_samples = ids.numel()

    def batch(self, n: int, g: torch.Generator):
        starts = torch.randint(0, self.ids.numel() - self.seqlen, (n,), generator=g)
        x = torch.stack([self.ids[s:s + self.seqlen] for s in starts.tolist()])
        return {"input_ids": x, "labels": x.clone(), "sample_ids": starts[:, None] + torch.arange(self.seqlen)}

    def eval_batches(self, n: int, bs: int):
        k = min(n * bs, self.ids.numel() // self.seqlen)
        x = self.ids[: k * self.seqlen].view(k, self.seqlen)
        return [{"input_ids": x[i:i + bs], "labels": x[i:i + bs].clone()} for i in range(0, k, bs)]


class PairData:
    """Prompt/response pairs: labels are -100 on the prompt and padding. A sample id is a token of one pair."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], seqlen: int, pad_id: int):
        self.ex, self.seqlen, self.pad = examples, seqlen, pad_id
        lens = [min(len(p) + len(r), seqlen) for p, r in examples]
        self.offsets = [sum(lens[:i]) for i in range(len(lens))]
        self.num_samples = sum(lens)

    def _collate(self, items, idx=None):
        rows = []
        for p, r in items:
            ids = (p + r)[: self.seqlen]
            lab = ([-100] * len(p) + r)[: self.seqlen]
            rows.append((ids, lab))
        L = max(len(i) for i, _ in rows)
        x = torch.full((len(rows), L), self.pad, dtype=torch.long)
        y = torch.full((len(rows), L), -100, dtype=torch.long)
        am = torch.zeros((len(rows), L), dtype=torch.long)
        sid = torch.full((len(rows), L), -1, dtype=torch.long)
        for k, (i, lab) in enumerate(rows):
            x[k, :len(i)] = torch.tensor(i)
            y[k, :len(lab)] = torch.tensor(lab)
            am[k, :len(i)] = 1
            if idx is not None:
                sid[k, :len(i)] = self.offsets[idx[k]] + torch.arange(len(i))
        b = {"input_ids": x, "labels": y, "attention_mask": am}
        if idx is not None:
            b["sample_ids"] = sid
        return b

    def batch(self, n: int, g: torch.Generator):
        idx = torch.randint(0, len(self.ex), (n,), generator=g).tolist()
        return self._collate([self.ex[i] for i in idx], idx)

    def eval_batches(self, n: int, bs: int):
        items = self.ex[: n * bs]
        return [self._collate(items[i:i + bs]) for i in range(0, len(items), bs)]


def load_data(source: str, tokenizer, seqlen: int):
    """(train, heldout) datasets from 'wiki', a .txt, or a .jsonl (text, or prompt/response pairs)."""
    from ..io.refs import load_text

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
def heldout_loss(model, batches, device, accelerator=None) -> float:
    """Token-weighted mean loss over ``batches``; with an accelerator each process takes its slice of each batch."""
    was = model.training
    model.eval()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    tot = torch.zeros(2, dtype=torch.float64, device=device)
    for b in batches:
        n = -(-b["input_ids"].shape[0] // world)
        b = {k: v[rank * n:(rank + 1) * n].to(device) for k, v in b.items() if k != "sample_ids"}
        if b["input_ids"].shape[0] == 0:
            continue
        cnt = int((b["labels"][:, 1:] != -100).sum())
        tot += torch.tensor([float(model(**b).loss) * cnt, cnt], dtype=torch.float64, device=device)
    if accelerator is not None and world > 1:
        tot = accelerator.reduce(tot, "sum")
    model.train(was)
    return float(tot[0] / tot[1].clamp_min(1))


def _lr_at(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "ACCELERATE_MIXED_PRECISION" in os.environ


def make_accelerator(accelerator=None, cpu: bool = False):
    """The Accelerator to use: the one given, a new one when launched by accelerate/torchrun (or True), else None.

    ``cpu``: processes compute on the CPU even where GPUs exist (``--device cpu``)."""
    if accelerator is False or (accelerator is None and not launched_distributed()):
        return None
    if accelerator is not None and accelerator is not True:
        return accelerator
    try:
        from accelerate import Accelerator
    except ImportError:
        raise MissingDependencyError("accelerate", "multi-process fine-tuning", "accelerate") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # torchrun on a machine without GPUs: accelerate treats the processes as one each unless told "cpu"
    acc = Accelerator(cpu=True) if cpu or (world > 1 and not torch.cuda.is_available()) else Accelerator()
    if acc.num_processes != world:
        raise ConfigError(f"launched as {world} processes but accelerate sees {acc.num_processes}; "
                          "launch with 'accelerate launch --multi_gpu' or 'torchrun'")
    return acc


def tune(model, tokenizer, method: str = "lora", data: str = "wiki", *, rank: int | None = 16,
         targets=None, steps: int = 100, lr: float = 2e-4, batch_size: int = 4, seqlen: int = 256,
         eval_every: int | None = None, eval_batches: int = 4, out=None, resume: bool = True,
         save_every: int | None = None, seed: int = 0, max_grad_norm: float = 1.0, warmup: float = 0.03,
         weight_decay: float = 0.0, merged: bool = True, progress: bool | None = None,
         on_eval: Callable[[int, float], None] | None = None, method_config: dict | None = None,
         train_data=None, heldout_data=None, loss_weighting: str | None = None,
         loss_weighting_config: dict | None = None, accelerator=None, device=None) -> dict:
    """Fine-tune ``model`` with adapter ``method``; returns {"history": [...], "heldout_before", "heldout_after", ...}.

    ``accelerator``: None = use accelerate only when launched by it (or torchrun); an
    ``accelerate.Accelerator`` to use that one; False to never use it.
    ``device`` (the shared policy: auto, cpu, cuda, cuda:N, mps): one process trains there (None: where the
    model is). Under accelerate/torchrun each process uses its local rank's accelerator; 'cpu' makes
    them CPU processes and a numbered 'cuda:N' is refused (the launcher assigns the GPUs).
    """
    from .. import adapt
    from ..engine.progress import progress as pbar
    from ..engine.sample_loss import LossWeighting

    from ..engine.device import resolve_device

    dev = resolve_device(device) if device is not None else None  # before any work: one clear error
    torch.manual_seed(seed)
    random.seed(seed)
    if dev is not None and dev.type == "cuda" and launched_distributed() and ":" in str(device):
        raise ConfigError(f"--device {device}: under several processes each one uses its local rank's GPU; "
                          "use --device auto, cuda or cpu")
    acc = make_accelerator(accelerator, cpu=dev is not None and dev.type == "cpu")
    prank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    is_main = prank == 0
    if acc is not None:
        model.to(acc.device)
    elif dev is not None:
        model.to(dev)
    device = next(model.parameters()).device
    tr, ho = (train_data, heldout_data) if train_data is not None else load_data(data, tokenizer, seqlen)
    out = Path(out) if out is not None else None
    ckpt = out / "checkpoint" if out is not None else None
    cfg = dict(method_config or {})
    fields = get_method("adapt", method).config.model_fields
    if rank is not None and "r" in fields:
        cfg.setdefault("r", rank)  # methods without a rank (SaRA, compander, ConTraCon) do not take one
    if "total_step" in fields:
        cfg.setdefault("total_step", steps)  # schedules over the run (AdaLoRA's rank budget), kept in its config
    weighting = (LossWeighting(loss_weighting, loss_weighting_config, num_samples=getattr(tr, "num_samples", 0))
                 if loss_weighting else None)
    start, history = 0, []
    # one generator on every process: all draw the same global batch and take their own slice
    g = torch.Generator().manual_seed(seed)
    if ckpt is not None and resume and (ckpt / "trainer.pt").is_file():
        adapt.load(model, ckpt / "adapter")
        state = torch.load(ckpt / "trainer.pt", weights_only=True)
        start, history = state["step"], state["history"]
        g.set_state(state["generator"])
        opt = adapt.make_optimizer(model, lr, weight_decay)
        opt.load_state_dict(state["optimizer"])
        if weighting is not None:
            if "weighting" not in state:
                raise ConfigError(f"{ckpt} was trained without loss weighting; drop --reweight or pass --no-resume")
            weighting.load_state_dict(state["weighting"])
    else:
        adapt.attach(model, method, targets=targets or _default_targets(model, method), **cfg)
        opt = adapt.make_optimizer(model, lr, weight_decay)
    raw = model
    params = adapt.trainable_parameters(raw)
    n_train = sum(p.numel() for p in params)
    if acc is not None:
        model, opt = acc.prepare(model, opt)
    eval_set = ho.eval_batches(eval_batches, batch_size * world)  # the same windows for any number of processes
    eval_every = eval_every or max(1, steps // 5)
    save_every = save_every or max(1, steps // 4)
    wsteps = max(1, int(warmup * steps))
    before = heldout_loss(model, eval_set, device, acc) if start == 0 else history[0]["heldout"]
    if start == 0:
        history.append({"step": 0, "heldout": before})
        if on_eval and is_main:
            on_eval(0, before)
    model.train()
    t0 = time.perf_counter()
    train_losses = []
    for step in pbar(range(start, steps), f"tune {method}", total=steps - start, enabled=progress and is_main):
        for grp in opt.param_groups:
            grp["lr"] = lr * _lr_at(step, steps, wsteps)
        b = tr.batch(batch_size * world, g)
        b = {k: v[prank * batch_size:(prank + 1) * batch_size].to(device) for k, v in b.items()}
        sample_ids = b.pop("sample_ids", None)
        if weighting is None:
            loss = model(**b).loss
        else:
            logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
            loss = weighting(logits, b["labels"], sample_ids, _gather_losses(acc, logits, b["labels"], weighting))
            if world > 1 and weighting.role == "reweighter":
                loss = loss * world  # DDP averages gradients; the global weighted sum needs their sum
        opt.zero_grad(set_to_none=True)
        acc.backward(loss) if acc is not None else loss.backward()
        if max_grad_norm:
            if acc is not None:
                acc.clip_grad_norm_(params, max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        adapt.backward_regularizers(raw)  # after clipping (SORSA), unclipped; identical on every process
        opt.step()
        adapt.step_hooks(raw, step + 1, steps)  # schedules and re-selection (PST, SaRA, DSEE)
        train_losses.append(float(loss.detach()) / (world if weighting is not None and weighting.role ==
                                                   "reweighter" else 1))
        s = step + 1
        if s % eval_every == 0 or s == steps:
            h = heldout_loss(model, eval_set, device, acc)
            history.append({"step": s, "heldout": h, "train": sum(train_losses[-eval_every:]) /
                            len(train_losses[-eval_every:])})
            if on_eval and is_main:
                on_eval(s, h)
        if ckpt is not None and (s % save_every == 0) and s < steps:
            if is_main:
                _save_checkpoint(raw, opt, s, history, g, ckpt, weighting)
            if acc is not None:
                acc.wait_for_everyone()
    seconds = time.perf_counter() - t0
    model.eval()
    result = {"method": method, "steps": steps, "trainable": n_train, "heldout_before": before,
              "heldout_after": history[-1]["heldout"], "history": history, "seconds": round(seconds, 2),
              "resumed_from": start, "processes": world, "process_index": prank}
    if weighting is not None:
        result["loss_weighting"] = {"name": weighting.name, "params": weighting.params}
    if out is not None and is_main:
        out.mkdir(parents=True, exist_ok=True)
        # the base it was trained on (a path here; PEFT export keeps only its public name)
        adapt.save(raw, out / "adapter", force=True, base_model=getattr(getattr(raw, "config", None), "_name_or_path",
                                                                        None) or None)
        (out / "history.json").write_text(json.dumps(result, indent=1))
        if merged:
            _save_merged(raw, tokenizer, out / "merged")
        if ckpt.exists():
            import shutil

            shutil.rmtree(ckpt, ignore_errors=True)
    if acc is not None:
        acc.wait_for_everyone()
    return result


def _gather_losses(acc, logits, labels, weighting):
    """(losses, counts, rank) of the global batch for a reweighter across processes; None in one process."""
    if acc is None or acc.num_processes == 1 or weighting.role != "reweighter":
        return None
    from ..engine.sample_loss import sequence_losses

    with torch.no_grad():
        losses, counts = sequence_losses(logits.detach(), labels)
    return acc.gather(losses), acc.gather(counts), acc.process_index


def _default_targets(model, method: str = "lora"):
    """The attention and MLP projections; a method's own defaults where it has them ((IA)^3: PEFT's)."""
    own = get_method("adapt", method).fn.default_targets
    names = {n for n, m in model.named_modules() if n}
    if own and any(n == t or n.endswith("." + t) for n in names for t in own):
        return list(own)
    leaves = {n.split(".")[-1] for n in names}
    t = [x for x in DEFAULT_TARGETS if x in leaves]
    return t or "all-linear"


def _save_checkpoint(model, opt, step, history, g, ckpt: Path, weighting=None) -> None:
    from .. import adapt
    from ..io.atomic import AtomicFolder

    state = {"step": step, "history": history, "optimizer": opt.state_dict(), "generator": g.get_state()}
    if weighting is not None:
        state["weighting"] = weighting.state_dict()
    with AtomicFolder(ckpt, force=True) as tmp:
        adapt.save(model, tmp / "adapter")
        torch.save(state, tmp / "trainer.pt")


def _save_merged(model, tokenizer, path: Path) -> None:
    import copy

    from .. import adapt
    from ..io.atomic import AtomicFolder

    m = copy.deepcopy(model)
    adapt.fold(m)
    with AtomicFolder(path, force=True) as tmp:
        m.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
