"""BigNAS for a small decoder-only transformer: a char-level language model on the text zoo (wiki_text).

The embedding width is fixed (slicing LayerNorm over the embedding width would change every child's
normalization); a child picks its depth (the first d blocks), and per block its MLP hidden size (leading units of
fc1 / fc2) and its number of attention heads (leading heads of q, k, v and the matching input columns of the
output projection; the head dimension is fixed). Its tensors are views of the supernet's (``child_tensors``).
BigNAS's "gamma = 0 in the last BN of every residual block" becomes: the attention output projection and the
second MLP layer start at zero, so every block is the identity at init and depth-only children agree.

Tokens: a fixed vocabulary of 97 symbols - newline, the 95 printable ASCII characters, and one "unknown" id for
everything else (0.16% of the zoo's Wikipedia text) - so a child folder needs no tokenizer file and bits per
character are comparable across runs. Data: the zoo's Wikipedia "calib" split (the first TRAIN_CHARS characters
train, the last VAL_CHARS validate, for the search) and the whole "heldout" split (21 other articles) as test,
cut into non-overlapping windows of CONTEXT characters; each window predicts its next characters.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .bignas_nets import Child, ElasticNet, width_choices

VOCAB = "\n" + "".join(chr(i) for i in range(32, 127))
UNK = len(VOCAB)  # id of every other character
VOCAB_SIZE = len(VOCAB) + 1
CONTEXT, TRAIN_CHARS, VAL_CHARS = 64, 400_000, 50_000

_LUT = np.full(128, UNK, dtype=np.int64)
_LUT[[ord(c) for c in VOCAB]] = np.arange(len(VOCAB))


def encode(text: str) -> torch.Tensor:
    """Character ids (int64) of `text` in the fixed vocabulary; characters outside it become UNK."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = np.full(len(cp), UNK, dtype=np.int64)
    ascii_ = cp < 128
    ids[ascii_] = _LUT[cp[ascii_]]
    return torch.from_numpy(ids)


def decode(ids) -> str:
    return "".join(VOCAB[i] if i < UNK else "\ufffd" for i in (int(j) for j in ids))


def windows(ids: torch.Tensor, context: int = CONTEXT) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows x (n, context) and their next characters y (n, context)."""
    n = (len(ids) - 1) // context
    if n < 1:
        raise ConfigError(f"a text of {len(ids)} characters has no full window of {context + 1}")
    x = ids[:n * context].reshape(n, context).clone()
    y = ids[1:n * context + 1].reshape(n, context).clone()
    return x, y


def text_arrays(context: int = CONTEXT, train_chars: int = TRAIN_CHARS, val_chars: int = VAL_CHARS) -> dict:
    """Train / val / test windows of the zoo's Wikipedia text (see the module docstring)."""
    from ..zoo import wiki_text

    calib = wiki_text("calib")
    if train_chars + val_chars > len(calib):
        raise ConfigError(f"train_chars + val_chars ({train_chars + val_chars:,}) exceed the {len(calib):,} "
                          "characters of the calib split")
    parts = {"train": calib[:train_chars], "val": calib[-val_chars:], "test": wiki_text("heldout")}
    out = {}
    for k, text in parts.items():
        out["x_" + k], out["y_" + k] = windows(encode(text), context)
    return out


# ----------------------------------------------------------------------------------------- the forward
def lm_forward(t: dict[str, torch.Tensor], heads, head_dim: int, x: torch.Tensor, dropout=None) -> torch.Tensor:
    """Pre-LN decoder on named tensors: tok_emb + pos_emb, per block i (heads[i] causal heads, GELU MLP)
    h += attn.out(attn(ln1(h))); h += mlp.fc2(gelu(mlp.fc1(ln2(h)))); ln_f, head. Returns (B, T, vocab)."""
    b, n = x.shape
    h = F.embedding(x, t["tok_emb.weight"]) + t["pos_emb.weight"][:n]
    d = h.shape[-1]
    for i, nh in enumerate(heads):
        p = f"blocks.{i}."
        a = F.layer_norm(h, (d,), t[p + "ln1.weight"], t[p + "ln1.bias"])
        q, k, v = (F.linear(a, t[f"{p}attn.{m}.weight"], t[f"{p}attn.{m}.bias"]).view(b, n, nh, head_dim)
                   .transpose(1, 2) for m in "qkv")
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, nh * head_dim)
        h = h + F.linear(o, t[p + "attn.out.weight"], t[p + "attn.out.bias"])
        m = F.layer_norm(h, (d,), t[p + "ln2.weight"], t[p + "ln2.bias"])
        h = h + F.linear(F.gelu(F.linear(m, t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"])),
                         t[p + "mlp.fc2.weight"], t[p + "mlp.fc2.bias"])
    h = F.layer_norm(h, (d,), t["ln_f.weight"], t["ln_f.bias"])
    if dropout is not None:
        h = dropout(h)
    return F.linear(h, t["head.weight"], t["head.bias"])


def _blocks(d_model: int, head_dim: int, heads, mlp_hidden) -> nn.ModuleList:
    blocks = nn.ModuleList()
    for nh, m in zip(heads, mlp_hidden):
        b = nn.Module()
        b.ln1, b.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        b.attn, b.mlp = nn.Module(), nn.Module()
        b.attn.q, b.attn.k, b.attn.v = (nn.Linear(d_model, nh * head_dim) for _ in range(3))
        b.attn.out = nn.Linear(nh * head_dim, d_model)
        b.mlp.fc1, b.mlp.fc2 = nn.Linear(d_model, m), nn.Linear(m, d_model)
        blocks.append(b)
    return blocks


class _LMBase(nn.Module):
    def _build(self, vocab_size, context, d_model, head_dim, heads, mlp_hidden):
        self.tok_emb, self.pos_emb = nn.Embedding(vocab_size, d_model), nn.Embedding(context, d_model)
        self.blocks = _blocks(d_model, head_dim, heads, mlp_hidden)
        self.ln_f, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab_size)


class ElasticLM(ElasticNet, _LMBase):
    """The supernet: `layers` blocks of `heads` heads (head_dim each; default d_model // heads) and an MLP of
    `mlp_hidden` units; every block's child choices are 1/4..4/4 of the heads and of the MLP units."""

    net = "lm"

    def __init__(self, vocab_size: int = VOCAB_SIZE, context: int = CONTEXT, d_model: int = 48, layers: int = 4,
                 heads: int = 4, mlp_hidden: int = 192, head_dim: int | None = None, dropout: float = 0.1):
        super().__init__()
        if layers < 1 or heads < 1 or mlp_hidden < 1:
            raise ConfigError(f"an elastic LM needs layers, heads and mlp_hidden >= 1 (got {layers}, {heads}, "
                              f"{mlp_hidden})")
        if head_dim is None and d_model % heads:
            raise ConfigError(f"d_model {d_model} is not divisible by {heads} heads; give head_dim")
        self.vocab_size, self.context, self.d_model = int(vocab_size), int(context), int(d_model)
        self.layers, self.heads, self.mlp_hidden = int(layers), int(heads), int(mlp_hidden)
        self.head_dim = int(head_dim or d_model // heads)
        self._build(self.vocab_size, self.context, self.d_model, self.head_dim, (self.heads,) * self.layers,
                    (self.mlp_hidden,) * self.layers)
        self.dropout = nn.Dropout(dropout)
        for m in self.modules():  # GPT-2's init: N(0, 0.02) weights, zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        for b in self.blocks:  # BigNAS's residual zero-init: each block starts as the identity
            nn.init.zeros_(b.attn.out.weight)
            nn.init.zeros_(b.mlp.fc2.weight)

    def arch(self) -> dict:
        return {"net": "lm", "vocab_size": self.vocab_size, "context": self.context, "d_model": self.d_model,
                "layers": self.layers, "heads": self.heads, "mlp_hidden": self.mlp_hidden,
                "head_dim": self.head_dim, "dropout": self.dropout.p}

    def space(self):
        return {"widths": [width_choices(self.mlp_hidden)] * self.layers,
                "depths": [tuple(range(1, self.layers + 1))], "kernels": [],
                "heads": [width_choices(self.heads)] * self.layers}

    def uniform_child(self, width: float = 1.0, depth: int | None = None, kernel: int | None = None,
                      heads: int | None = None) -> Child:
        """Every block at `width` x the largest MLP and `width` x the heads (or `heads` heads), `depth` blocks."""
        if kernel is not None:
            raise ConfigError("a transformer (lm) supernet has no kernel sizes; leave --kernel out")
        c = super().uniform_child(width, depth)
        nh = max(1, round(width * self.heads)) if heads is None else int(heads)
        if nh not in width_choices(self.heads):
            raise ConfigError(f"{nh} heads is not in this lm supernet's space (choices "
                              f"{list(width_choices(self.heads))})")
        return Child(c.widths, c.depths, (), (nh,) * self.layers)

    def child_tensors(self, child, buffers=True):
        hd, t = self.head_dim, {"tok_emb.weight": self.tok_emb.weight, "pos_emb.weight": self.pos_emb.weight}
        for i in range(child.depths[0]):
            b, p, a, m = self.blocks[i], f"blocks.{i}.", child.heads[i] * hd, child.widths[i]
            for ln in ("ln1", "ln2"):
                t[f"{p}{ln}.weight"], t[f"{p}{ln}.bias"] = getattr(b, ln).weight, getattr(b, ln).bias
            for n in "qkv":
                lin = getattr(b.attn, n)
                t[f"{p}attn.{n}.weight"], t[f"{p}attn.{n}.bias"] = lin.weight[:a], lin.bias[:a]
            t[p + "attn.out.weight"], t[p + "attn.out.bias"] = b.attn.out.weight[:, :a], b.attn.out.bias
            t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"] = b.mlp.fc1.weight[:m], b.mlp.fc1.bias[:m]
            t[p + "mlp.fc2.weight"], t[p + "mlp.fc2.bias"] = b.mlp.fc2.weight[:, :m], b.mlp.fc2.bias
        t["ln_f.weight"], t["ln_f.bias"] = self.ln_f.weight, self.ln_f.bias
        t["head.weight"], t["head.bias"] = self.head.weight, self.head.bias
        return t

    def child_arch(self, child):
        d = child.depths[0]
        return {"net": "lm", "vocab_size": self.vocab_size, "context": self.context, "d_model": self.d_model,
                "head_dim": self.head_dim, "heads": list(child.heads[:d]), "mlp_hidden": list(child.widths[:d])}

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randint(0, self.vocab_size, (batch, self.context))

    def forward(self, x):
        child = self.active
        drop = self.dropout if self.training and child == self.max_child() else None
        return lm_forward(self.child_tensors(child), child.heads[:child.depths[0]], self.head_dim, x, drop)


class BigNASLM(_LMBase):
    """A stand-alone child: ordinary Embedding / LayerNorm / Linear modules under the supernet's names."""

    def __init__(self, vocab_size: int, context: int, d_model: int, head_dim: int, heads, mlp_hidden):
        super().__init__()
        if len(heads) != len(mlp_hidden) or not heads:
            raise ConfigError(f"an LM child needs one heads and one mlp_hidden entry per block (got {list(heads)}, "
                              f"{list(mlp_hidden)})")
        self.head_dim, self.heads = int(head_dim), tuple(int(h) for h in heads)
        self._build(int(vocab_size), int(context), int(d_model), self.head_dim, self.heads,
                    tuple(int(m) for m in mlp_hidden))

    def forward(self, x):
        return lm_forward(dict(self.named_parameters()), self.heads, self.head_dim, x)


def lm_param_count(vocab: int, context: int, d_model: int, head_dim: int, heads, mlp_hidden) -> int:
    """Closed form of a child's parameters (embeddings, per block 2 LN + q/k/v/out + fc1/fc2, ln_f, head)."""
    d, n = d_model, vocab * d_model + context * d_model + 2 * d_model + d_model * vocab + vocab
    for nh, m in zip(heads, mlp_hidden):
        a = nh * head_dim
        n += 4 * d + 3 * (d * a + a) + (a * d + d) + (d * m + m) + (m * d + d)
    return n


@torch.no_grad()
def evaluate_lm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> dict:
    """Bits per character and next-character accuracy over every position of the windows, eval mode."""
    was = model.training
    model.eval()
    nats, hits = 0.0, 0
    try:
        for i in range(0, len(x), batch_size):
            out = model(x[i:i + batch_size]).flatten(0, 1)
            tgt = y[i:i + batch_size].reshape(-1)
            nats += float(F.cross_entropy(out, tgt, reduction="sum"))
            hits += int((out.argmax(1) == tgt).sum())
    finally:
        model.train(was)
    n = y.numel()
    return {"bits_per_char": nats / n / math.log(2), "accuracy": hits / n, "perplexity": math.exp(nats / n),
            "tokens": n}
