"""Attention sinks, value-state drains, residual peaks and active/dormant heads (Guo et al., arXiv 2410.13835).

Everything is read with hooks on the model's own modules under eager attention; nothing
of the model is re-implemented. Per text domain, one forward pass gives per head the
attention mass on the first token, the row entropy, and the norm of each token's value
pushed through the head's slice of o_proj (sink token vs the others), and per layer the
residual-stream norm of the first token vs the others.

The dormant test replaces one head's attention by all-on-the-first-token. Attention rows
that are one-hot on key 0 output exactly v_0, so the test writes v_0 into that head's slice
of the o_proj input (exact for any attention kernel). ``dormant_test="exact"`` reruns the
model for each tested head, restarting at the head's layer from the stored layer inputs
(about 60% of a forward each; minutes on a CPU for SmolLM2's 270 heads).
``dormant_test="linear"`` (the default) estimates every head's loss change at once from one
backward pass: dloss ~ sum over positions of grad(loss wrt the head's output) . (v_0 - output).
It is accurate where it matters for classification, on sinks, whose output is already close
to v_0, but it understates the larger changes, so it can call a few active heads dormant; on
SmolLM2 it gives the exact test's state for 92% of the sink heads (benchmarks/internals.py).

Thresholds are weightlab's choice (the paper gives none): a head is a sink on a domain when
its mean attention on the first token is >= 0.5; it is dormant there when it is a sink and
the all-on-first-token replacement moves the domain's loss by less than 1% of the loss;
otherwise it is active.
"""
from __future__ import annotations

import importlib
import inspect as pyinspect
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field

from ..engine.result import Result
from ..engine.progress import progress
from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from .neurons import model_parts

PAPER = ("Guo et al., Active-dormant attention heads: mechanistically demystifying extreme-token phenomena in LLMs "
         "(arXiv 2410.13835)")

# Python's own source: real code with docstrings that ships with every interpreter, so the
# "code" domain needs no download and is the same text on every machine with one Python version.
CODE_MODULES = ("textwrap", "json.decoder", "json.encoder", "difflib", "heapq", "bisect", "fractions", "shlex",
                "string", "calendar", "statistics", "argparse")


class HeadsConfig(MethodConfig):
    domains: list[str] = Field(["wiki", "code"], description="'wiki', 'code' or a .txt/.jsonl file per domain")
    windows: int = Field(2, ge=1, description="token windows per domain, spread evenly over the text")
    seqlen: int = Field(128, ge=4, description="tokens per window, the first-token/BOS included")
    bos: bool = Field(True, description="start each window with the tokenizer's BOS token (the usual sink)")
    sink_threshold: float = Field(0.5, gt=0, le=1,
                                  description="[weightlab] mean attention on the first token for a sink")
    dormant_threshold: float = Field(0.01, ge=0,
                                     description="[weightlab] |loss change| / loss below which a sink is dormant")
    dormant_test: Literal["linear", "exact", "none"] = Field(
        "linear", description="loss change of attention moved to the first token: first-order estimate for all heads "
                              "from one backward pass, exact rerun per tested head, or none")
    tested: Literal["sinks", "all"] = Field("sinks",
                                            description="heads rerun by the exact test (sinks suffice to classify)")


def domain_text(name: str) -> str:
    if name == "wiki":
        from ..zoo import wiki_text

        return wiki_text("heldout")
    if name == "code":
        return "\n\n".join(pyinspect.getsource(importlib.import_module(m)) for m in CODE_MODULES)
    from ..io.refs import load_text

    return load_text(name)


def domain_windows(tokenizer, text: str, windows: int, seqlen: int, bos: bool = True) -> torch.Tensor:
    """(windows, seqlen) ids: windows spread evenly over the text, each led by BOS when asked."""
    lead = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
    body = seqlen - len(lead)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < body:
        raise ConfigError(f"the text has {len(ids)} tokens, fewer than one window of {body}; pass more text "
                          "or a smaller seqlen")
    span = len(ids) - body
    starts = [round(span * i / max(1, windows - 1)) for i in range(windows)] if windows > 1 else [0]
    return torch.tensor([lead + ids[s:s + body] for s in starts])


@contextmanager
def eager_attention(model):
    """Eager attention for the block so attention probabilities are materialised."""
    before = model.config._attn_implementation

    def use(impl):
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(impl)
        else:  # older transformers read the config at every forward
            model.config._attn_implementation = impl

    if before != "eager":
        use("eager")
    try:
        yield
    finally:
        if before != "eager":
            use(before)


def _geometry(model, layers):
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    attn = layers[0].self_attn
    if not all(hasattr(attn, n) for n in ("v_proj", "o_proj")):
        raise ConfigError(f"{type(attn).__name__} has no v_proj/o_proj; head analysis needs Llama-style attention")
    hd = getattr(attn, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, hd


def _ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(_ce(logits, ids))


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def _base_pass(model, ids, linear: bool = False):
    """Metrics of every head and layer, the loss, each layer's inputs for replays and, when
    linear, the first-order loss change of every head's all-on-first-token replacement."""
    layers, _, _ = model_parts(model)
    H, KV, hd = _geometry(model, layers)
    group = H // KV
    n = ids.shape[1]
    span = torch.log(torch.arange(2, n + 1, dtype=torch.float32))  # visible keys of queries 1..n-1
    rows: list[dict] = [{} for _ in layers]
    saved: list = [None] * len(layers)
    mixed: list = [None] * len(layers)  # o_proj inputs: the heads' outputs side by side
    values: list = [None] * len(layers)
    handles = []

    def keep_inputs(i):
        def hook(_m, args, kwargs):
            detach = lambda t: t.detach() if isinstance(t, torch.Tensor) else t  # noqa: E731
            saved[i] = (tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()})
            if i == 0 and linear:  # a graph from here on, even for a frozen model, and none into the embeddings
                a, kw = saved[0]
                if a:
                    return (a[0].clone().requires_grad_(True), *a[1:]), kw
                return a, {**kw, "hidden_states": kw["hidden_states"].clone().requires_grad_(True)}
            return None
        return hook

    def keep_mixed(i):
        def hook(_m, args):
            mixed[i] = args[0]
        return hook

    def attn_stats(i):
        def hook(_m, _inp, out):
            a = out[1].detach().float()  # (B, H, N, N)
            q = a[:, :, 1:, :]  # query 0 sees only itself
            rows[i]["sink_mass"] = q[..., 0].mean(dim=(0, 2))
            ent = -torch.special.xlogy(q, q).sum(-1) / span
            rows[i]["row_entropy"] = ent.mean(dim=(0, 2))
        return hook

    def value_stats(i, o_proj):
        def hook(_m, _inp, out):
            values[i] = out.detach()[:, :1]
            v = out.detach().float().unflatten(-1, (KV, hd))
            wo = o_proj.weight.detach().float().unflatten(1, (H, hd))  # (d, H, hd)
            norms = torch.stack([(v[:, :, h // group] @ wo[:, h].T).norm(dim=-1) for h in range(H)])  # (H, B, N)
            rows[i]["value_first"] = norms[:, :, 0].mean(1)
            rows[i]["value_others"] = norms[:, :, 1:].flatten(1).median(1).values
        return hook

    def resid_stats(i):
        def hook(_m, _inp, out):
            r = _hidden(out).detach().float().norm(dim=-1)  # (B, N)
            rows[i]["resid_first"] = float(r[:, 0].mean())
            rows[i]["resid_median"] = float(r[:, 1:].median())
            rows[i]["resid_max"] = float(r[:, 1:].max(1).values.mean())
        return hook

    for i, layer in enumerate(layers):
        attn = layer.self_attn
        handles += [layer.register_forward_pre_hook(keep_inputs(i), with_kwargs=True),
                    attn.register_forward_hook(attn_stats(i)),
                    attn.v_proj.register_forward_hook(value_stats(i, attn.o_proj)),
                    attn.o_proj.register_forward_pre_hook(keep_mixed(i)),
                    layer.register_forward_hook(resid_stats(i))]
    try:
        with eager_attention(model), torch.set_grad_enabled(linear):
            logits = model(ids, use_cache=False).logits
            loss = _ce(logits, ids)
    finally:
        for h in handles:
            h.remove()
    if any("sink_mass" not in r for r in rows):
        raise ConfigError("the attention modules returned no attention probabilities under eager attention; "
                          "this architecture is not supported by the head analysis")
    if linear:
        grads = torch.autograd.grad(loss, mixed)
        for i, (x, g) in enumerate(zip(mixed, grads)):
            x, g = x.detach().float().unflatten(-1, (H, hd)), g.float().unflatten(-1, (H, hd))
            v0 = values[i].float().unflatten(-1, (KV, hd)).repeat_interleave(group, dim=2)  # (B, 1, H, hd)
            rows[i]["dloss_linear"] = (g * (v0 - x)).sum(dim=(0, 1, 3))
    return rows, saved, float(loss.detach())


@torch.no_grad()
def replay_loss(model, ids, saved, layer: int, head: int | None) -> float:
    """Loss when the run restarts at `layer` from stored inputs, with `head` (if any) attending
    only to the first token."""
    layers, norm, lm_head = model_parts(model)
    H, KV, hd = _geometry(model, layers)
    attn = layers[layer].self_attn
    handles, v0 = [], {}
    if head is not None:
        kv = head // (H // KV)

        def grab_v(_m, _inp, out):
            v0["v"] = out[:, :1, kv * hd:(kv + 1) * hd]

        def put_v(_m, args):
            x = args[0].clone()
            x[..., head * hd:(head + 1) * hd] = v0["v"]
            return (x, *args[1:])

        handles = [attn.v_proj.register_forward_hook(grab_v), attn.o_proj.register_forward_pre_hook(put_v)]
    try:
        with eager_attention(model):
            args, kwargs = saved[layer]
            x = args[0] if args else kwargs["hidden_states"]
            for j in range(layer, len(layers)):
                a, kw = saved[j]
                out = layers[j](x, *a[1:], **kw) if a else layers[j](**{**kw, "hidden_states": x})
                x = _hidden(out)
            return _loss(lm_head(norm(x)), ids)
    finally:
        for h in handles:
            h.remove()


@dataclass
class HeadsReport(Result):
    """Rows per (domain, layer, head) and per (domain, layer), plus a summary per domain."""

    heads: list[dict]
    layers: list[dict]
    domains: dict[str, dict]
    config: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"config": self.config, "domains": self.domains, "heads": self.heads, "layers": self.layers}

    def grid(self, domain: str, key: str) -> list[list]:
        """key per [layer][head] on one domain (None where not measured)."""
        rows = [r for r in self.heads if r["domain"] == domain]
        n_layers, n_heads = max(r["layer"] for r in rows) + 1, max(r["head"] for r in rows) + 1
        g = [[None] * n_heads for _ in range(n_layers)]
        for r in rows:
            g[r["layer"]][r["head"]] = r[key]
        return g


def classify(sink_mass: float, rel_dloss: float | None, cfg: HeadsConfig) -> str:
    if sink_mass < cfg.sink_threshold:
        return "active"
    if rel_dloss is None:
        return "sink-untested"
    return "dormant" if abs(rel_dloss) < cfg.dormant_threshold else "active"


@register("inspect", "heads", paper=PAPER, config=HeadsConfig, regime=Regime.WHOLE_MODEL, kind="whole",
          summary="per layer/head and text domain: attention mass on the first token, row entropy, value-state drain, "
                  "residual-norm peaks, and the dormant test (attention moved to the first token, loss change); "
                  "heads classified active or dormant per domain")
def analyze_heads(model, tokenizer, cfg: HeadsConfig = HeadsConfig(), texts: dict[str, str] | None = None,
                  show_progress: bool | None = None, device=None) -> HeadsReport:
    """texts maps domain name -> text and overrides cfg.domains.

    ``device``: None runs where the model is; otherwise the model is moved there (in place) first
    ('auto', 'cpu', 'cuda', 'cuda:N', 'mps'). Rows come back as plain Python numbers.
    """
    from ..engine.placement import place

    dev = place(model, device)
    layers, _, _ = model_parts(model)
    H = _geometry(model, layers)[0]
    texts = texts if texts is not None else {d: domain_text(d) for d in cfg.domains}
    head_rows, layer_rows, domains = [], [], {}
    for dom, text in texts.items():
        t0 = time.perf_counter()
        ids = domain_windows(tokenizer, text, cfg.windows, cfg.seqlen, cfg.bos).to(dev)
        stats, saved, base = _base_pass(model, ids, linear=cfg.dormant_test != "none")
        # one transfer per statistic instead of a device sync per head when the rows are built
        stats = [{k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in r.items()} for r in stats]
        todo = [] if cfg.dormant_test != "exact" else [
            (li, h) for li in range(len(layers)) for h in range(H)
            if cfg.tested == "all" or float(stats[li]["sink_mass"][h]) >= cfg.sink_threshold]
        dloss = {}
        if cfg.dormant_test == "linear":
            dloss = {(li, h): float(s["dloss_linear"][h]) for li, s in enumerate(stats) for h in range(H)}
        for li, h in progress(todo, f"dormant test on {dom}", enabled=show_progress):
            dloss[(li, h)] = replay_loss(model, ids, saved, li, h) - base
        del saved
        for li, s in enumerate(stats):
            first, resid_med = s["resid_first"], s["resid_median"]
            layer_rows.append({"domain": dom, "layer": li, "resid_first": first, "resid_median": resid_med,
                               "resid_max": s["resid_max"], "peak_ratio": first / max(resid_med, 1e-12)})
            for h in range(H):
                d = dloss.get((li, h))
                rel = None if d is None else d / base
                mass, vf, vo = float(s["sink_mass"][h]), float(s["value_first"][h]), float(s["value_others"][h])
                head_rows.append({"domain": dom, "layer": li, "head": h, "sink_mass": mass,
                                  "row_entropy": float(s["row_entropy"][h]), "value_first": vf, "value_others": vo,
                                  "drain_ratio": vf / max(vo, 1e-12), "dloss": d, "rel_dloss": rel,
                                  "dloss_linear": float(s["dloss_linear"][h]) if "dloss_linear" in s else None,
                                  "sink": mass >= cfg.sink_threshold, "state": classify(mass, rel, cfg)})
        mine = [r for r in head_rows if r["domain"] == dom]
        domains[dom] = {"loss": base, "tokens": int(ids.numel()), "windows": int(ids.shape[0]),
                        "sinks": sum(r["sink"] for r in mine), "dormant": sum(r["state"] == "dormant" for r in mine),
                        "active": sum(r["state"] == "active" for r in mine), "heads": len(mine),
                        "dormant_test": cfg.dormant_test, "rerun": len(todo), "seconds": time.perf_counter() - t0,
                        "perplexity": math.exp(base)}
    return HeadsReport(head_rows, layer_rows, domains, cfg.model_dump())
