"""MixtureGrowth (Pham et al., WACV 2024): layers as linear combinations of templates; growing by new ones.

A grown hidden layer of width g*b is a g x g grid of (b x b) blocks. Block (i, j) belongs to one
member m and is W_m = sum_k c[m, k] T[i, k]: row i's template set (K templates, default 2) mixed
by the member's coefficients. The seed stage trains only the diagonal members: g independent
half-width networks (g = 2: members 0 and 1 with sets 0 and 1), as an ensemble, each with its own
loss. Growth switches on the off-diagonal members (g = 2: block (0,1) is member 2 on set 0, block
(1,0) member 3 on set 1, the reference's ``member_template_sets = [0, 1, 0, 1]``) with new
coefficients over the already trained templates. The first layer and the classifier are plain
linears (the reference's set_input/set_output with fixed coefficient 1); their member slices are
row / column blocks.

Coefficient init: rows of an orthogonal (members x K) matrix (``nn.init.orthogonal_``).
Growth rules (``how``): "orthogonal" (default, reference): the first new member keeps its
initial coefficients, every later one takes eta times the last right-singular vector of the
stacked coefficients of all members before it (eta = ``coefs_noise_growing`` = 1); "zero": the
off-diagonal blocks start at 0, so the grown network computes exactly the seed ensemble's logit
sum; "random": fresh orthogonal-init rows times eta; "copy": the same set's seed member's
coefficients plus N(0, (0.01 eta)^2) noise (weightlab's noise scale; the reference's was not read).
The reference also adds kaiming-normal extra templates when template sizes differ; here the
template sets are fixed. Materialize: ``weight()`` is the plain matrix, ``to_mlp`` a plain model.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register


def _members(g: int) -> torch.Tensor:
    """(g, g) member index per block: diagonal i -> i, off-diagonal blocks numbered after, row-major."""
    idx = torch.empty(g, g, dtype=torch.long)
    nxt = g
    for i in range(g):
        for j in range(g):
            if i == j:
                idx[i, j] = i
            else:
                idx[i, j] = nxt
                nxt += 1
    return idx


class MixtureLinear(nn.Module):
    """A g x g grid of (block_out x block_in) blocks, block (i, j) = sum_k coefs[member(i, j), k] templates[i, k]."""

    def __init__(self, block_in: int, block_out: int, grid: int = 2, templates: int = 2, bias: bool = True):
        super().__init__()
        self.grid, self.block_in, self.block_out = grid, block_in, block_out
        T = torch.empty(grid, templates, block_out, block_in)
        for t in T.view(-1, block_out, block_in):
            nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # what nn.Linear would give each template
        self.templates = nn.Parameter(T)
        C = torch.empty(grid * grid, templates)
        nn.init.orthogonal_(C)
        self.coefs = nn.Parameter(C)
        self.bias = nn.Parameter(torch.zeros(grid * block_out)) if bias else None
        self.register_buffer("member", _members(grid))
        self.register_buffer("active", torch.arange(grid * grid) < grid)  # seed stage: diagonal only

    def block(self, i: int, j: int) -> torch.Tensor:
        m = int(self.member[i, j])
        return torch.einsum("k,koi->oi", self.coefs[m], self.templates[i])

    def weight(self) -> torch.Tensor:
        g = self.grid
        rows = []
        for i in range(g):
            row = [self.block(i, j) if self.active[self.member[i, j]] else
                   self.templates.new_zeros(self.block_out, self.block_in) for j in range(g)]
            rows.append(torch.cat(row, 1))
        return torch.cat(rows, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)

    def member_forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Seed member i alone: its diagonal block on its slice of the features."""
        b = self.bias[i * self.block_out:(i + 1) * self.block_out] if self.bias is not None else None
        return F.linear(x, self.block(i, i), b)

    @property
    def grown(self) -> bool:
        return bool(self.active.all())


class MixtureMLP(nn.Module):
    """An MLP whose hidden-to-hidden layers are :class:`MixtureLinear` (shape of the zoo MLP).

    ``hidden`` is the grown width; each of the ``grid`` seed members is ``hidden / grid`` wide.
    """

    def __init__(self, in_features: int, hidden: int = 64, depth: int = 2, num_classes: int = 10, grid: int = 2,
                 templates: int = 2):
        super().__init__()
        if hidden % grid:
            raise ConfigError(f"hidden width {hidden} is not divisible by grid {grid}")
        if depth < 2:
            raise ConfigError("MixtureMLP needs depth >= 2 (at least one hidden-to-hidden layer to grow)")
        b = hidden // grid
        self.grid, self.block = grid, b
        self.first = nn.Linear(in_features, hidden)
        self.mids = nn.ModuleList(MixtureLinear(b, b, grid, templates) for _ in range(depth - 1))
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.first(x.flatten(1)))
        for m in self.mids:
            h = F.relu(m(h))
        return self.head(h)

    def member_forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Seed member i's logits (a half-width network; the head bias is shared)."""
        s = slice(i * self.block, (i + 1) * self.block)
        h = F.relu(F.linear(x.flatten(1), self.first.weight[s], self.first.bias[s]))
        for m in self.mids:
            h = F.relu(m.member_forward(h, i))
        return F.linear(h, self.head.weight[:, s], self.head.bias)

    def seed_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The seed ensemble's loss: each member trained on its own cross-entropy."""
        return sum(F.cross_entropy(self.member_forward(x, i), y) for i in range(self.grid))

    def to_mlp(self) -> nn.Sequential:
        """The plain (materialized) network: Linear/ReLU layers with W = sum c T."""
        layers: list[nn.Module] = [_linear(self.first.weight, self.first.bias), nn.ReLU()]
        for m in self.mids:
            layers += [_linear(m.weight(), m.bias), nn.ReLU()]
        layers.append(_linear(self.head.weight, self.head.bias))
        return nn.Sequential(*layers)


def _linear(W: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(W)
        if b is not None:
            lin.bias.copy_(b)
    return lin


class GrowConfig(MethodConfig):
    how: Literal["orthogonal", "zero", "random", "copy"] = "orthogonal"
    eta: float = 1.0  # coefs_noise_growing
    seed: int = 0


def grow_coefficients(C: torch.Tensor, n_seed: int, how: str = "orthogonal", eta: float = 1.0,
                      gen: torch.Generator | None = None, sets: list[int] | None = None) -> torch.Tensor:
    """New coefficient rows n_seed.. of C (members x K) by the growth rule ``how``; rows < n_seed kept."""
    C = C.detach().clone()
    for i in range(n_seed, C.shape[0]):
        if how == "zero":
            C[i] = 0
        elif how == "random":
            R = torch.empty(C.shape[0], C.shape[1])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                nn.init.orthogonal_(R)
            C[i] = eta * R[i]
        elif how == "copy":
            C[i] = C[sets[i] if sets else i % n_seed] + 0.01 * eta * torch.randn(C.shape[1], generator=gen)
        elif i > n_seed:  # orthogonal: the first grown member keeps its initial coefficients (reference)
            _, _, Vh = torch.linalg.svd(C[:i].double(), full_matrices=True)
            C[i] = eta * Vh[-1].to(C.dtype)
    return C


@register("adapt", "mixturegrowth", kind="whole", regime=Regime.WHOLE_MODEL, config=GrowConfig,
          paper="Pham et al. 2024, MixtureGrowth: Growing Neural Networks by "
                "Recombining Learned Parameters (WACV 2024); reference code chaudatascience/mixturegrowth",
          summary="layers as linear combinations of templates; grow a network with new coefficients over the "
                  "trained templates (MixtureMLP + grow; not an adapter for attach)")
def grow(model: nn.Module, cfg: GrowConfig | None = None, **params) -> nn.Module:
    """Switch on every MixtureLinear's off-diagonal members with coefficients from the growth rule; in place."""
    if isinstance(model, MethodConfig):
        raise ConfigError("mixturegrowth is a model family, not an adapter: build weightlab.adapt.mixturegrowth."
                          "MixtureMLP, train its seed members, then call grow(model)")
    cfg = cfg or GrowConfig(**params)
    layers = [m for m in model.modules() if isinstance(m, MixtureLinear)]
    if not layers:
        raise ConfigError("grow() found no MixtureLinear layer in the model")
    gen = torch.Generator().manual_seed(cfg.seed)
    for m in layers:
        if m.grown:
            raise ConfigError("the model is already grown")
        sets = [int((m.member == k).nonzero()[0, 0]) for k in range(m.grid ** 2)]  # member -> its row's set
        with torch.no_grad():
            m.coefs.copy_(grow_coefficients(m.coefs, m.grid, cfg.how, cfg.eta, gen, sets))
            m.active.fill_(True)
    return model
