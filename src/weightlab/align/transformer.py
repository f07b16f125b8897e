"""Hand-written permutation specs for HF transformer blocks.

Llama-style decoders (llama, mistral, qwen2):
- one residual-stream permutation shared by the embedding, every RMSNorm gain, the input
  axis of q/k/v/gate/up, the output axis of o_proj/down_proj and the LM head input: RMSNorm
  divides by a root mean square, which does not depend on the order of the channels;
- per layer, a permutation of the MLP hidden units (gate/up rows, down_proj columns);
- per layer, a permutation of key/value heads. With grouped-query attention, query heads
  j*g .. j*g+g-1 read key/value head j, so a KV-head permutation moves that block of g query
  heads with it (and the matching o_proj columns). Whole heads commute with RoPE; the order
  of dimensions inside a head does not, so it is left alone.
BERT encoders: the same residual stream (LayerNorm is order-free too: its mean and variance
are), per-layer MLP units and attention heads; the pooler output gets its own permutation
when a classifier reads it, and an MLM head's transform joins the residual stream because
its decoder is tied to the word embeddings.
"""
from __future__ import annotations

from ..errors import ConfigError
from .spec import PermutationSpec

_LLAMA = ("llama", "mistral", "qwen2", "qwen3")


def hf_spec(model) -> PermutationSpec:
    cfg = model.config
    names = set(model.state_dict())
    if cfg.model_type in _LLAMA:
        return llama_spec(cfg, names)
    if cfg.model_type == "bert":
        return bert_spec(cfg, names)
    raise ConfigError(f"no permutation spec for model_type '{cfg.model_type}'; known: "
                      f"{', '.join(_LLAMA + ('bert',))}. Write one by hand (PermutationSpec) and pass spec=")


def _prefix(names: set[str], marker: str) -> str:
    for n in sorted(names):
        if marker in n:
            return n[: n.index(marker)]
    raise ConfigError(f"no tensor containing '{marker}' in the model")


def llama_spec(cfg, names: set[str]) -> PermutationSpec:
    p = _prefix(names, "embed_tokens.weight")
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    groups: dict[str, list] = {"residual": [(f"{p}embed_tokens.weight", 1), (f"{p}norm.weight", 0)]}
    sizes = {"residual": d}
    if "lm_head.weight" in names:
        groups["residual"].append(("lm_head.weight", 1))

    def have(*ts):
        return [t for t in ts if t in names]

    for i in range(L):
        b = f"{p}layers.{i}."
        res = groups["residual"]
        res += [(f"{b}input_layernorm.weight", 0), (f"{b}post_attention_layernorm.weight", 0)]
        res += [(f"{b}self_attn.{x}_proj.weight", 1) for x in "qkv"]
        res += [(t, 0) for t in have(f"{b}self_attn.o_proj.weight", f"{b}self_attn.o_proj.bias")]
        res += [(f"{b}mlp.gate_proj.weight", 1), (f"{b}mlp.up_proj.weight", 1)]
        res += [(t, 0) for t in have(f"{b}mlp.down_proj.weight", f"{b}mlp.down_proj.bias")]
        # qwen3-style per-head q/k norms are shared by all heads: head order is free
        groups[f"mlp.{i}"] = [(t, 0) for t in have(f"{b}mlp.gate_proj.weight", f"{b}mlp.gate_proj.bias",
                                                     f"{b}mlp.up_proj.weight", f"{b}mlp.up_proj.bias")]
        groups[f"mlp.{i}"].append((f"{b}mlp.down_proj.weight", 1))
        sizes[f"mlp.{i}"] = cfg.intermediate_size
        attn = [(t, 0) for x in "qkv" for t in have(f"{b}self_attn.{x}_proj.weight", f"{b}self_attn.{x}_proj.bias")]
        groups[f"heads.{i}"] = attn + [(f"{b}self_attn.o_proj.weight", 1)]
        sizes[f"heads.{i}"] = kv
    notes = ["the order of dimensions inside an attention head is kept (RoPE rotates dimension pairs)"]
    if kv != heads:
        notes.append(f"grouped-query attention: {heads // kv} query heads move with each of the {kv} KV heads")
    return PermutationSpec(groups, sizes, notes)


def bert_spec(cfg, names: set[str]) -> PermutationSpec:
    p = _prefix(names, "embeddings.word_embeddings.weight")
    d, L, heads = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
    e = f"{p}embeddings."
    res = [(f"{e}{x}_embeddings.weight", 1) for x in ("word", "position", "token_type") if
           f"{e}{x}_embeddings.weight" in names]
    res += [(f"{e}LayerNorm.weight", 0), (f"{e}LayerNorm.bias", 0)]
    groups: dict[str, list] = {"residual": res}
    sizes = {"residual": d}
    notes = []
    for i in range(L):
        b = f"{p}encoder.layer.{i}."
        a = f"{b}attention."
        res += [(f"{a}self.{x}.weight", 1) for x in ("query", "key", "value")]
        res += [(f"{a}output.dense.weight", 0), (f"{a}output.dense.bias", 0),
                (f"{a}output.LayerNorm.weight", 0), (f"{a}output.LayerNorm.bias", 0),
                (f"{b}intermediate.dense.weight", 1), (f"{b}output.dense.weight", 0), (f"{b}output.dense.bias", 0),
                (f"{b}output.LayerNorm.weight", 0), (f"{b}output.LayerNorm.bias", 0)]
        groups[f"mlp.{i}"] = [(f"{b}intermediate.dense.weight", 0), (f"{b}intermediate.dense.bias", 0),
                              (f"{b}output.dense.weight", 1)]
        sizes[f"mlp.{i}"] = cfg.intermediate_size
        groups[f"heads.{i}"] = [(f"{a}self.{x}.{w}", 0) for x in ("query", "key", "value") for w in ("weight", "bias")]
        groups[f"heads.{i}"].append((f"{a}output.dense.weight", 1))
        sizes[f"heads.{i}"] = heads
    if f"{p}pooler.dense.weight" in names:
        res.append((f"{p}pooler.dense.weight", 1))
        if "classifier.weight" in names:
            groups["pooler"] = [(f"{p}pooler.dense.weight", 0), (f"{p}pooler.dense.bias", 0), ("classifier.weight", 1)]
            sizes["pooler"] = d
        else:
            notes.append("the pooler output is a model output: not permuted")
    t = "cls.predictions.transform."
    if f"{t}dense.weight" in names:
        res += [(f"{t}dense.weight", 1), (f"{t}dense.weight", 0), (f"{t}dense.bias", 0),
                (f"{t}LayerNorm.weight", 0), (f"{t}LayerNorm.bias", 0)]
        if "cls.predictions.decoder.weight" in names:
            res.append(("cls.predictions.decoder.weight", 1))
    if not any(n.startswith("cls.") or n.startswith("classifier.") for n in names):
        notes.append("a bare encoder outputs the residual stream: aligned outputs come out in A's channel order")
    return PermutationSpec(groups, sizes, notes)
