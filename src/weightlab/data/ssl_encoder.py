"""Encoders for the prototype metric: a small SimCLR encoder trained without labels, and MiniLM for text.

The prototype metric of "Beyond neural scaling laws" clusters embeddings of a *self-supervised*
encoder (SwAV on ImageNet in the paper). There is no pretrained image encoder for weightlab's
small datasets, so `train_ssl_encoder` trains one on the samples themselves in seconds: an MLP
trained with SimCLR's NT-Xent loss (Chen et al., 2020) between two random views of every sample.
SimCLR, not SwAV: both are instance-discrimination objectives on the same views, and SimCLR needs
no Sinkhorn step or prototype queue. Labels are never read.

The views are SCARF's (Bahri et al., 2022): every feature is, with probability `corruption`,
replaced by the same feature of a random other sample, then a little Gaussian noise is added.
This needs no knowledge of the layout, so it works on standardised features of any dataset.
Shifting the sample by a few pixels / steps (`max_shift`, with `shape`) is available for raw
images but off by default: on the zoo's *standardised* digits it made the encoder worse (k-NN
0.89 vs 0.94 after 50 epochs), as a shifted standardised pixel is no longer a shifted pixel.
"""
from __future__ import annotations

import itertools

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..registry import MethodConfig

# sample layouts of the zoo datasets; anything else is a flat feature vector
SHAPES = {"digits": (8, 8), "mnist1d": (40,)}


class SSLEncoderConfig(MethodConfig):
    """SimCLR on an MLP. tau = 0.5 is SimCLR's small-batch CIFAR setting; the rest is sized so
    that a few thousand samples train in seconds on one CPU thread."""

    dim: int = Field(64, ge=2, description="embedding width (the backbone output used for the prototypes)")
    hidden: int = Field(256, ge=2, description="hidden width of the backbone MLP")
    proj_dim: int = Field(32, ge=2, description="projection-head width the contrastive loss sees")
    epochs: int = Field(50, ge=0)
    batch_size: int = Field(256, ge=2)
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    weight_decay: float = Field(1e-6, ge=0)
    temperature: float = Field(0.5, gt=0, description="NT-Xent temperature")
    corruption: float = Field(0.2, ge=0, lt=1, description="fraction of features replaced by another sample's "
                                                            "value in each view (SCARF)")
    noise: float = Field(0.1, ge=0, description="std of the Gaussian noise added to each view")
    max_shift: int = Field(0, ge=0, description="largest random shift in pixels / steps when the sample "
                                                "shape is known (0 = off; see the module note)")
    seed: int = 0


class SSLEncoder(nn.Module):
    """backbone (embeddings) + projection head (only for the loss, as in SimCLR)."""

    def __init__(self, num_features: int, hidden: int = 256, dim: int = 64, proj_dim: int = 32):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                      nn.ReLU(), nn.Linear(hidden, dim))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Backbone outputs of every row of x (eval mode), on the CPU."""
        dev = next(self.parameters()).device
        was = self.training
        self.eval()
        try:
            return torch.cat([self.backbone(x[i:i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])
        finally:
            self.train(was)


def shift(x: torch.Tensor, shape: tuple[int, ...], offsets: torch.Tensor) -> torch.Tensor:
    """Translate every sample (rows of x, laid out as `shape`) by its integer offsets, filling with 0.

    offsets: (N, len(shape)); a positive offset moves content towards higher indices.
    """
    n = len(x)
    img = x.reshape(n, *shape)
    s = int(offsets.abs().max()) if offsets.numel() else 0
    if s == 0:
        return x.clone()
    pad = [s, s] * len(shape)
    padded = F.pad(img, pad)
    out = torch.empty_like(img)
    # a handful of distinct offsets (9 or 25 in 2-D): one slice per offset, not per sample
    for off in itertools.product(range(-s, s + 1), repeat=len(shape)):
        rows = (offsets == torch.tensor(off)).all(1).nonzero().flatten()
        if len(rows) == 0:
            continue
        sl = tuple(slice(s - o, s - o + size) for o, size in zip(off, shape))
        out[rows] = padded[(rows, *sl)]
    return out.reshape(n, -1)


def augment(x: torch.Tensor, shape: tuple[int, ...] | None, cfg: SSLEncoderConfig,
            gen: torch.Generator) -> torch.Tensor:
    """One random view of every row of x (draws come from `gen` on the CPU, so a seed fixes them)."""
    n, d = x.shape
    out = x
    if shape is not None and cfg.max_shift > 0:
        offsets = torch.randint(-cfg.max_shift, cfg.max_shift + 1, (n, len(shape)), generator=gen)
        out = shift(out.cpu(), shape, offsets).to(x.device)
    replace = (torch.rand(n, d, generator=gen) < cfg.corruption).to(x.device)
    donors = torch.randint(0, n, (n, d), generator=gen).to(x.device)
    marginal = torch.gather(x, 0, donors)  # feature j of a random other sample (SCARF's corruption)
    noise = torch.randn(n, d, generator=gen).to(x.device, x.dtype) * cfg.noise
    return torch.where(replace, marginal, out) + noise


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner out of the 2B - 1 other views of the batch."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    b = len(z1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, target)


def random_encoder(num_features: int, cfg: SSLEncoderConfig | None = None) -> SSLEncoder:
    """The untrained encoder `train_ssl_encoder` starts from (the baseline a trained one must beat)."""
    cfg = cfg or SSLEncoderConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return SSLEncoder(num_features, cfg.hidden, cfg.dim, cfg.proj_dim)


def train_ssl_encoder(x: torch.Tensor, cfg: SSLEncoderConfig | None = None, *, shape: tuple[int, ...] | None = None,
                      device=None, return_losses: bool = False):
    """Train a SimCLR encoder on the rows of x (no labels). Returns it in eval mode on the CPU.

    `shape`: the layout of one sample (e.g. (8, 8) or (40,)), needed only for `cfg.max_shift` > 0
    (views are then also shifted copies). `device`: where it trains (None: the CPU).
    With `return_losses`, also the mean loss of every epoch.
    """
    cfg = cfg or SSLEncoderConfig()
    if x.ndim != 2:
        raise ConfigError(f"the SSL encoder trains on (samples, features); got shape {tuple(x.shape)}")
    n, d = x.shape
    if n < 2:
        raise ConfigError(f"contrastive training needs at least 2 samples; got {n}")
    if shape is not None and _prod(shape) != d:
        raise ConfigError(f"sample shape {shape} does not hold {d} features")
    if not torch.isfinite(x).all():
        raise ConfigError("the features hold NaN or Inf")
    from ..engine.placement import place

    model = random_encoder(d, cfg)
    dev = place(model, device)
    x = x.float().to(dev)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bs = min(cfg.batch_size, n)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread is as fast, and runs repeat bit for bit
    try:
        model.train()
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=gen)
            total, steps = 0.0, 0
            # drop a last batch of 1: it has no negatives
            for start in range(0, n - 1, bs):
                idx = order[start:start + bs].to(dev)
                if len(idx) < 2:
                    continue
                xb = x[idx]
                v1, v2 = augment(xb, shape, cfg, gen), augment(xb, shape, cfg, gen)
                loss = nt_xent(model.head(model(v1)), model.head(model(v2)), cfg.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, steps = total + float(loss.detach()), steps + 1
            losses.append(total / max(steps, 1))
    finally:
        torch.set_num_threads(threads)
    model = model.cpu().eval()
    return (model, losses) if return_losses else model


def _prod(shape) -> int:
    p = 1
    for s in shape:
        p *= int(s)
    return p


def minilm_embeddings(texts: list[str], *, batch_size: int = 32, max_tokens: int = 256, model=None,
                      tokenizer=None) -> torch.Tensor:
    """Mean-pooled all-MiniLM-L6-v2 embeddings of `texts` (the sentence-transformers pooling; its
    256-token limit). The zoo model is loaded offline unless (model, tokenizer) are given."""
    if not texts:
        raise ConfigError("no texts to embed")
    if not all(isinstance(t, str) for t in texts):
        raise ConfigError("texts must be strings")
    if model is None or tokenizer is None:
        from ..zoo import load_minilm

        model, tokenizer = load_minilm()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=max_tokens,
                            return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append((h * m).sum(1) / m.sum(1).clamp_min(1))
    return torch.cat(out).float()
