"""Feature neurons read through the LM head (Davies et al., arXiv 2501.02688).

Each MLP neuron i of a gated block owns three vectors in the residual basis: the rows
gate_proj.weight[i] and up_proj.weight[i] (what it reads) and the column
down_proj.weight[:, i] (what it writes, scaled by its activation). Pushing a vector through
the model's own final norm and LM head gives a distribution over the vocabulary; its top
tokens name the concept the neuron stands for.

weightlab decodes the down column by default: it is literally the direction the neuron adds
to the residual stream, so final-norm + LM head is the path it actually takes to the logits.
The paper decodes up rows (read vectors), which is only meaningful because the residual
basis is shared; ``vector="up"`` reproduces that, and its >75% base-vs-instruct agreement
claim is about up rows.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field

from ..engine.progress import progress
from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register

PAPER = "Davies, Decoding specialised feature neurons in LLMs with the final projection layer (arXiv 2501.02688)"
VECTORS = ("down", "up", "gate")


class NeuronsConfig(MethodConfig):
    vector: Literal["down", "up", "gate"] = Field("down", description="down columns (written), up or gate rows (read)")
    top_k: int = Field(5, ge=1, le=100, description="tokens kept per neuron")
    layers: list[int] | None = Field(None, description="layer indices to decode; all when omitted")
    negative: bool = Field(False, description="decode -v instead of v (what the neuron suppresses when it fires)")
    chunk_mib: int = Field(256, ge=1, description="cap on the logits block of one matmul; larger is one pass per layer")


def model_parts(model):
    """(decoder layers, final norm, LM head) of a Llama-style causal LM; ConfigError otherwise."""
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if layers is None or norm is None or head is None:
        raise ConfigError(f"{type(model).__name__} is not a Llama-style causal LM (needs model.layers, model.norm and "
                          "an LM head); neuron and head analyses support Llama, Mistral, Qwen2 and SmolLM-like models")
    return layers, norm, head


def neuron_vectors(mlp, vector: str) -> torch.Tensor:
    """(d_ff, d) matrix of one MLP's neuron vectors in the residual basis."""
    names = {"down": "down_proj", "up": "up_proj", "gate": "gate_proj"}
    lin = getattr(mlp, names[vector], None)
    if lin is None:
        raise ConfigError(f"{type(mlp).__name__} has no {names[vector]}; only gated MLPs (gate/up/down) are supported")
    w = lin.weight.detach()
    return w.t() if vector == "down" else w


def _layer_ids(n_layers: int, layers) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    bad = [i for i in layers if not -n_layers <= i < n_layers]
    if bad:
        raise ConfigError(f"layer {bad[0]} does not exist; the model has layers 0..{n_layers - 1}")
    return sorted({i % n_layers for i in layers})


@torch.no_grad()
def decode_vectors(vectors: torch.Tensor, norm, head, top_k: int, token_ids: list[int] | None = None,
                   chunk_mib: int = 256):
    """Top-k token ids and probabilities of each row pushed through norm and head.

    Rows are decoded in one matmul, split only so the (rows, vocab) logits stay under
    chunk_mib. With token_ids, also returns each row's total probability of those tokens.
    """
    vocab = head.weight.shape[0]
    dtype = head.weight.dtype
    step = max(1, (chunk_mib << 20) // (vocab * 4))
    ids, probs, hits = [], [], []
    for s in range(0, vectors.shape[0], step):
        logits = head(norm(vectors[s:s + step].to(dtype))).float()
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        top, idx = logits.topk(top_k, dim=-1)
        ids.append(idx)
        probs.append((top - lse).exp())
        if token_ids:
            hits.append((logits[:, token_ids] - lse).exp().sum(-1))
    # results leave the device: NeuronMap rows, JSON and comparisons are CPU-side
    return torch.cat(ids).cpu(), torch.cat(probs).cpu(), (torch.cat(hits).cpu() if token_ids else None)


@dataclass
class NeuronMap:
    """Decoded neurons: per layer index, (d_ff, top_k) token ids and probabilities."""

    vector: str
    top_ids: dict[int, torch.Tensor]
    top_probs: dict[int, torch.Tensor]
    seconds: float
    layer_seconds: dict[int, float] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] | None = None  # probability of the searched token(s), when searched

    @property
    def neurons(self) -> int:
        return sum(t.shape[0] for t in self.top_ids.values())

    def rows(self, tokenizer=None, best_first: bool = False, limit: int | None = None) -> list[dict]:
        """[{"layer", "neuron", "top_tokens", "score"}]; score is the searched token's probability
        when a token was searched, else the top-1 probability."""
        entries = []
        for layer, ids in self.top_ids.items():
            score = self.scores[layer] if self.scores is not None else self.top_probs[layer][:, 0]
            for i in range(ids.shape[0]):
                entries.append((float(score[i]), layer, i))
        if best_first:
            entries.sort(key=lambda e: (-e[0], e[1], e[2]))
        out = []
        for score, layer, i in entries[:limit]:
            ids = self.top_ids[layer][i].tolist()
            toks = [tokenizer.decode([t]) for t in ids] if tokenizer is not None else ids
            out.append({"layer": layer, "neuron": i, "top_tokens": toks, "score": score})
        return out


@register("inspect", "neurons", paper=PAPER, config=NeuronsConfig, regime=Regime.WHOLE_MODEL, kind="whole",
          summary="every MLP neuron's down column (or up/gate row) decoded through the final norm and LM head into "
                  "its top tokens, one batched matmul per layer; search by token, clamp, compare two models")
def decode_neurons(model, cfg: NeuronsConfig = NeuronsConfig(), token_ids: list[int] | None = None,
                   show_progress: bool | None = None, device=None) -> NeuronMap:
    """``device``: None decodes where the model is; otherwise the model is moved there (in place) first."""
    from ..engine.placement import place

    place(model, device)
    layers, norm, head = model_parts(model)
    ids_of, probs_of, scores, secs = {}, {}, {}, {}
    t0 = time.perf_counter()
    for li in progress(_layer_ids(len(layers), cfg.layers), f"decoding {cfg.vector} neurons", enabled=show_progress):
        t = time.perf_counter()
        vec = neuron_vectors(layers[li].mlp, cfg.vector)
        ids_of[li], probs_of[li], hit = decode_vectors(-vec if cfg.negative else vec, norm, head, cfg.top_k,
                                                      token_ids, cfg.chunk_mib)
        if hit is not None:
            scores[li] = hit
        secs[li] = time.perf_counter() - t
    return NeuronMap(cfg.vector, ids_of, probs_of, time.perf_counter() - t0, secs, scores if token_ids else None)


def token_variants(tokenizer, word: str) -> list[int]:
    """Ids of the single-token spellings of word: as given, with a leading space, capitalised."""
    ids = []
    special = set(getattr(tokenizer, "all_special_ids", None) or [])  # an unknown word maps to <unk>: not a match
    for form in dict.fromkeys((word, " " + word, word.capitalize(), " " + word.capitalize())):
        t = tokenizer(form, add_special_tokens=False)["input_ids"]
        if len(t) == 1 and t[0] not in ids and t[0] not in special:
            ids.append(t[0])
    if not ids:
        pieces = [tokenizer.decode([t]) for t in tokenizer(" " + word, add_special_tokens=False)["input_ids"]]
        raise ConfigError(f"'{word}' is not a single token in this vocabulary (' {word}' splits into {pieces}); "
                          "search for one of those pieces")
    return ids


def find_neurons(model, tokenizer, word: str, cfg: NeuronsConfig = NeuronsConfig(), limit: int = 20,
                 show_progress: bool | None = None, device=None) -> list[dict]:
    """Neurons that decode to word, best first; score = probability of the word's single-token spellings."""
    nmap = decode_neurons(model, cfg, token_ids=token_variants(tokenizer, word), show_progress=show_progress,
                          device=device)
    return nmap.rows(tokenizer, best_first=True, limit=limit)


def parse_neuron(spec: str) -> tuple[int, int]:
    """'L:I' -> (layer, neuron)."""
    try:
        layer, idx = (int(p) for p in spec.split(":"))
    except ValueError:
        raise ConfigError(f"a neuron is written LAYER:INDEX, e.g. 12:345; got {spec!r}") from None
    return layer, idx


@contextmanager
def clamped(model, neurons: list[tuple[int, int]], value: float):
    """Inside the block, each (layer, neuron)'s activation (the input of down_proj) is fixed to value
    at every position, including tokens produced during generation."""
    layers, _, _ = model_parts(model)
    by_layer: dict[int, list[int]] = {}
    for layer, idx in neurons:
        if not 0 <= layer < len(layers):
            raise ConfigError(f"layer {layer} does not exist; the model has layers 0..{len(layers) - 1}")
        width = layers[layer].mlp.down_proj.in_features
        if not 0 <= idx < width:
            raise ConfigError(f"neuron {idx} does not exist in layer {layer}; it has neurons 0..{width - 1}")
        by_layer.setdefault(layer, []).append(idx)

    def hook_for(idxs):
        def hook(_mod, args):
            h = args[0].clone()
            h[..., idxs] = value
            return (h, *args[1:])
        return hook

    handles = [layers[li].mlp.down_proj.register_forward_pre_hook(hook_for(ix)) for li, ix in by_layer.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _next_token(model, ids):
    return torch.softmax(model(ids).logits[0, -1].float(), -1)


@torch.no_grad()
def _activations(model, ids, neurons):
    layers, _, _ = model_parts(model)
    seen, handles = {}, []
    for layer, idx in neurons:
        def hook(_m, args, layer=layer, idx=idx):
            seen[(layer, idx)] = args[0][0, :, idx].float()
        handles.append(layers[layer].mlp.down_proj.register_forward_pre_hook(hook))
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def _generate(model, tokenizer, ids, max_new_tokens):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def clamp_neurons(model, tokenizer, neurons: list[tuple[int, int]], value: float, prompt: str,
                  max_new_tokens: int = 20, top: int = 5, vector: str = "down",
                  watch: list[int] | None = None, device=None) -> dict:
    """Next-token probabilities and greedy text with and without the neurons clamped to value.

    Watched tokens are the given ids followed by the clamped neurons' own decoded top tokens,
    so the expected effect (their probability rises for positive values) can be read off directly.
    ``device``: None runs where the model is; otherwise the model is moved there (in place) first.
    """
    from ..engine.placement import place

    dev = place(model, device)
    layers, norm, head = model_parts(model)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(dev)
    if ids.shape[1] == 0:
        raise ConfigError("the prompt is empty")
    watch = list(dict.fromkeys(watch or []))
    for layer, idx in neurons:
        with clamped(model, [(layer, idx)], 0.0):  # validates the indices before anything runs
            pass
        vec = neuron_vectors(layers[layer].mlp, vector)[idx:idx + 1]
        for t in decode_vectors(vec, norm, head, 3)[0][0].tolist():
            if t not in watch:
                watch.append(t)
    acts = _activations(model, ids, neurons)
    before = _next_token(model, ids)
    text_before = _generate(model, tokenizer, ids, max_new_tokens)
    with clamped(model, neurons, value):
        after = _next_token(model, ids)
        text_after = _generate(model, tokenizer, ids, max_new_tokens)

    def tops(p):
        pr, ix = p.topk(top)
        return [{"token": tokenizer.decode([int(i)]), "prob": float(q)} for q, i in zip(pr, ix)]

    return {
        "neurons": [f"{layer}:{idx}" for layer, idx in neurons], "value": value, "prompt": prompt,
        "activation_on_prompt": {f"{k[0]}:{k[1]}": {"max": float(a.max()), "min": float(a.min())}
                                 for k, a in acts.items()},
        "watched": [{"token": tokenizer.decode([t]), "before": float(before[t]), "after": float(after[t])}
                    for t in watch],
        "before": {"top": tops(before), "text": text_before},
        "after": {"top": tops(after), "text": text_after},
    }


def compare_neurons(model_a, model_b, cfg: NeuronsConfig = NeuronsConfig(), show_progress: bool | None = None,
                    device=None) -> dict:
    """Share of neurons whose top-1 decoded token is the same in both models, overall and per layer.

    Either side may be a NeuronMap decoded before (e.g. one base against several variants)."""
    heads = [m.get_output_embeddings().weight.shape for m in (model_a, model_b) if not isinstance(m, NeuronMap)]
    if len(heads) == 2 and heads[0] != heads[1]:
        raise ConfigError(f"the models' LM heads differ in shape ({tuple(heads[0])} vs {tuple(heads[1])}); "
                          "neurons can only be compared over the same vocabulary")
    one = cfg.model_copy(update={"top_k": 1})
    a, b = (m if isinstance(m, NeuronMap) else decode_neurons(m, one, show_progress=show_progress, device=device)
            for m in (model_a, model_b))
    if a.vector != b.vector:
        raise ConfigError(f"cannot compare {a.vector} vectors with {b.vector} vectors")
    if a.top_ids.keys() != b.top_ids.keys() or any(a.top_ids[k].shape[0] != b.top_ids[k].shape[0] for k in a.top_ids):
        raise ConfigError("the models have different layer counts or MLP widths; compare models of one architecture")
    per_layer = {k: float((a.top_ids[k][:, 0] == b.top_ids[k][:, 0]).float().mean()) for k in a.top_ids}
    same = sum(int((a.top_ids[k][:, 0] == b.top_ids[k][:, 0]).sum()) for k in a.top_ids)
    return {"vector": cfg.vector, "neurons": a.neurons, "same_top_token": same / max(1, a.neurons),
            "per_layer": per_layer, "seconds": a.seconds + b.seconds}
