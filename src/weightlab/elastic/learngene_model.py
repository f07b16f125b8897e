"""The small vision transformer of Learngene-SWS: one class for the teacher, the Aux-Net and descendants.

A ``TinyViT`` runs ``depth`` layers; layer l applies ``blocks[layer_block[l]]``. A plain model (teacher,
descendant) has one block per layer (``layer_block = 0..depth-1``); the stage-wise weight-sharing Aux-Net
has one block per *stage* and ``layer_block`` repeats stage s n_s times, so the layers of a stage hold the
same Parameter objects and its state dict - the learngene - stores each stage's block once.

Layout (DeiT's, reduced for 8x8 digits / MNIST-1D, design notes section 2c): non-overlapping patches
(a Linear on the flattened patch = a stride-p conv), a learned position embedding, pre-norm blocks
(LN, multi-head self-attention, LN, GELU MLP), a final LN, mean pooling over tokens (no cls token, as the
reference's global-average-pool setting) and a linear head. Head layout is identical in every model
(head_dim = dim / heads): the reference's Aux-S (12 heads x 32) vs DeiT-S (6 x 64) mismatch is avoided.
Init: truncated normal std 0.02 for Linear weights and the position embedding, zero biases, LN (1, 0).
Stochastic depth rates are per *layer* (linspace over the depth), even where layers share weights.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class ViTShape:
    """Everything that fixes the tensors of a TinyViT except its depth."""

    input_shape: tuple[int, ...]  # (8, 8) images or (40,) sequences; the flat features reshape to it
    patch: int
    dim: int = 64
    heads: int = 4
    mlp_ratio: float = 2.0
    num_classes: int = 10

    def __post_init__(self):
        if len(self.input_shape) not in (1, 2) or any(s % self.patch for s in self.input_shape):
            raise ConfigError(f"input shape {self.input_shape} does not split into patches of {self.patch}")
        if self.dim % self.heads:
            raise ConfigError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if int(self.dim * self.mlp_ratio) < 1:
            raise ConfigError(f"mlp_ratio {self.mlp_ratio} leaves no MLP hidden units")

    @property
    def tokens(self) -> int:
        return math.prod(s // self.patch for s in self.input_shape)

    @property
    def patch_numel(self) -> int:
        return self.patch ** len(self.input_shape)

    @property
    def hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)

    def block_params(self) -> int:
        """Parameters of one block: two LayerNorms, qkv, proj, fc1, fc2 (with biases)."""
        d, h = self.dim, self.hidden
        return 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)

    def stem_params(self, head: bool = True) -> int:
        """Everything outside the blocks: patch embedding, position embedding, final LN, head."""
        d = self.dim
        n = self.patch_numel * d + d + self.tokens * d + 2 * d
        return n + (d * self.num_classes + self.num_classes if head else 0)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["input_shape"] = list(self.input_shape)
        return out


def shape_for(num_features: int, num_classes: int, patch: int | None = None, **kw) -> ViTShape:
    """The ViTShape of a zoo dataset: 64 features are an 8x8 image (2x2 patches), others a sequence
    (patches of 4: MNIST-1D's 40 steps give 10 tokens)."""
    side = math.isqrt(num_features)
    shape = (side, side) if side * side == num_features and side > 1 else (num_features,)
    p = patch or (2 if len(shape) == 2 else 4)
    return ViTShape(shape, p, num_classes=num_classes, **kw)


class Block(nn.Module):
    """Pre-norm transformer block; ``drop_path`` is passed per call (the rate belongs to the layer)."""

    def __init__(self, s: ViTShape):
        super().__init__()
        self.heads = s.heads
        self.norm1 = nn.LayerNorm(s.dim)
        self.qkv = nn.Linear(s.dim, 3 * s.dim)
        self.proj = nn.Linear(s.dim, s.dim)
        self.norm2 = nn.LayerNorm(s.dim)
        self.fc1 = nn.Linear(s.dim, s.hidden)
        self.fc2 = nn.Linear(s.hidden, s.dim)

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        hd = C // self.heads
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        a = ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(B, N, C))

    def forward(self, x: torch.Tensor, drop_path: float = 0.0) -> torch.Tensor:
        x = x + _drop_path(self.attn(self.norm1(x)), drop_path, self.training)
        return x + _drop_path(self.fc2(F.gelu(self.fc1(self.norm2(x)))), drop_path, self.training)


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability p, rescale by 1/(1-p)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


@dataclass
class Layout:
    """Which block each layer runs: ``stages`` = None for a plain model, else the stage lengths n_s."""

    depth: int
    stages: list[int] | None = None
    layer_block: list[int] = field(init=False)

    def __post_init__(self):
        if self.stages is None:
            if self.depth < 1:
                raise ConfigError(f"depth must be >= 1, got {self.depth}")
            self.layer_block = list(range(self.depth))
            return
        if not self.stages or any(int(n) < 1 for n in self.stages):
            raise ConfigError(f"stages must be positive layer counts, got {self.stages}")
        if sum(self.stages) != self.depth:
            raise ConfigError(f"stage lengths {self.stages} sum to {sum(self.stages)}, not the depth {self.depth}")
        self.layer_block = [s for s, n in enumerate(self.stages) for _ in range(int(n))]

    @property
    def num_blocks(self) -> int:
        return len(self.stages) if self.stages is not None else self.depth


class TinyViT(nn.Module):
    def __init__(self, shape: ViTShape, depth: int, stages: list[int] | None = None, drop_path: float = 0.0):
        super().__init__()
        self.shape, self.layout = shape, Layout(depth, None if stages is None else [int(n) for n in stages])
        d = shape.dim
        self.patch_embed = nn.Linear(shape.patch_numel, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, shape.tokens, d))
        self.blocks = nn.ModuleList(Block(shape) for _ in range(self.layout.num_blocks))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, shape.num_classes)
        # per-layer stochastic-depth rates over the *layers* (reference: linspace(0, rate, depth))
        self.drop_path_rates = [0.0] * depth if depth == 1 else torch.linspace(0, drop_path, depth).tolist()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_weights)

    @property
    def depth(self) -> int:
        return self.layout.depth

    @property
    def stages(self) -> list[int] | None:
        return self.layout.stages

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) flat features -> (B, N, patch_numel) non-overlapping patches, row-major."""
        B, p, shp = x.shape[0], self.shape.patch, self.shape.input_shape
        if len(shp) == 1:
            return x.reshape(B, shp[0] // p, p)
        H, W = shp
        return x.reshape(B, H // p, p, W // p, p).permute(0, 1, 3, 2, 4).reshape(B, (H // p) * (W // p), p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embed(self.tokens(x.flatten(1))) + self.pos_embed
        for layer, b in enumerate(self.layout.layer_block):
            h = self.blocks[b](h, self.drop_path_rates[layer])
        return self.head(self.norm(h).mean(1))

    def config(self) -> dict:
        return {**self.shape.as_dict(), "depth": self.depth, "stages": self.stages}


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        m.reset_parameters()


def build(shape: ViTShape, depth: int, stages: list[int] | None = None, seed: int = 0,
          drop_path: float = 0.0) -> TinyViT:
    """A freshly initialised TinyViT whose init depends only on ``seed`` (the caller's RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyViT(shape, depth, stages, drop_path)


def unique_params(model: nn.Module) -> int:
    """Stored parameters: each Parameter object counted once, however many layers use it."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
