"""PLeaS: Permutations and Least Squares (Nasery, Hayase, Koh, Oh, "PLeaS -- Merging Models
with Permutations and Least Squares", CVPR 2025).

1. Match B's units to A's by activation matching (cost -||a_i - b_j||^2 summed over the data)
   or by weight matching.
2. Partial merge, per permutation group with ratio r: the (1 - r) fraction of matched pairs
   with the best scores C[i, P(i)] become one unit each; the other r fraction is kept twice,
   once from A and once from B, so the layer has n(1 + r) units. r = 0 merges fully (the
   size of one model), r = 1 keeps everything (the size of the ensemble).
3. Least squares, layer by layer: inputs X = [(X_A,m + X_B,m)/2, X_A,only, X_B,only] and
   targets Y = [(Y_A,m + Y_B,m)/2, Y_A,only, Y_B,only] come from the *original* models, so
   the layers decouple; A-only units never read B-only inputs and vice versa. The
   reference fits this with 400 Adam steps; here each row block is solved exactly in
   closed form, W = Y X^T (X X^T + eps I)^-1 with eps = ridge * tr / n, the minimiser that
   Adam approaches. The output layer's target is the mean of both models' logits.
The data may be the task's own inputs, or public inputs from another source (the paper's
data-free "PLeaS-free" variant uses ImageNet for every task): pass those as ``x``.

Supported: chains of Linear/Conv layers with per-channel ops between them (activations,
pooling, BatchNorm, which is folded into the layer before it, and flatten into a Linear),
such as the zoo's MLP and SmallCNN. Residual streams are refused.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from pydantic import Field
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from .derive import module_order, spec_from_module
from .spec import units_view

_LAYERS = (nn.Linear, nn.Conv2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


class PleasConfig(MethodConfig):
    ratio: float = Field(0.0, ge=0.0, le=1.0, description="share of units kept unmerged per layer (0: full merge)")
    ratios: dict[str, float] | None = Field(None, description="per-group ratio, by permutation group name")
    matching: str = Field("activation", pattern="^(activation|weight)$")
    ridge: float = Field(1e-4, ge=0.0, description="eps = ridge * trace / n in the least-squares solve")
    batch_size: int = Field(512, gt=0)


@dataclass
class PleasResult:
    model: nn.Module
    widths: dict[str, int]  # group -> merged width
    perms: dict[str, torch.Tensor]
    layer_error: dict[str, float]  # relative squared error ||W X - Y||^2 / ||Y||^2 of each refit layer
    params: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy with every BatchNorm folded into the Linear/Conv that feeds it (eval statistics)."""
    model = copy.deepcopy(model).eval()
    spec = spec_from_module(model)
    mods = dict(model.named_modules())
    for p, entries in spec.groups.items():
        producer = mods.get(p)
        bns = {t.rsplit(".", 1)[0] for t, _ in entries if t.endswith(".running_mean")}
        for bn_name in bns:
            bn = mods[bn_name]
            if not isinstance(producer, _LAYERS):
                raise ConfigError(f"BatchNorm '{bn_name}' does not follow a Linear/Conv layer; cannot fold it")
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(
                bn.running_var + bn.eps)
            shift = bn.bias if bn.affine else torch.zeros_like(scale)
            bias = producer.bias if producer.bias is not None else torch.zeros_like(scale)
            new = _like(producer, producer.weight.shape[1] if isinstance(producer, nn.Linear) else producer.in_channels,
                        producer.weight.shape[0])
            new.weight.copy_(producer.weight * scale.view(-1, *[1] * (producer.weight.dim() - 1)))
            new.bias.copy_((bias - bn.running_mean) * scale + shift)
            _set_module(model, p, new)
            _set_module(model, bn_name, nn.Identity())
            mods = dict(model.named_modules())
            producer = mods[p]
    return model


def _like(layer: nn.Module, n_in: int, n_out: int) -> nn.Module:
    if isinstance(layer, nn.Linear):
        return nn.Linear(n_in, n_out)
    return nn.Conv2d(n_in, n_out, layer.kernel_size, layer.stride, layer.padding, layer.dilation)


def _chain(model: nn.Module):
    """Layers in forward order with the group they read from and the group they write to."""
    spec = spec_from_module(model)
    mods = dict(model.named_modules())
    order = [n for n in module_order(model) if isinstance(mods[n], _LAYERS)]
    reads, writes = {}, {}
    for p, entries in spec.groups.items():
        producers = [t for t, a in entries if a == 0 and t.endswith(".weight") and t[:-7] in order]
        consumers = [t[:-7] for t, a in entries if a == 1 and t[:-7] in order]
        if len(producers) != 1 or len(consumers) != 1:
            raise ConfigError(f"PLeaS needs each hidden layer to feed exactly one layer; group '{p}' has "
                              f"{len(producers)} producers and {len(consumers)} consumers (residual streams are "
                              f"not supported)")
        writes[producers[0][:-7]] = p
        reads[consumers[0]] = p
    for name in order:
        if isinstance(mods[name], nn.Conv2d) and mods[name].groups != 1:
            raise ConfigError(f"PLeaS does not support grouped conv '{name}'")
    return order, reads, writes, spec


@torch.no_grad()
def _record(model: nn.Module, layers: list[str], x: torch.Tensor, batch_size: int):
    """Per layer: raw input (for matching), unfolded input columns X and outputs Y."""
    mods = dict(model.named_modules())
    store = {n: {"raw": [], "X": [], "Y": []} for n in layers}
    hooks = []
    for n in layers:
        def hook(m, inp, out, n=n):
            i = inp[0]
            store[n]["raw"].append(i)
            if isinstance(m, nn.Conv2d):
                cols = F.unfold(i, m.kernel_size, m.dilation, m.padding, m.stride)  # (N, C*k*k, L)
                store[n]["X"].append(cols.transpose(1, 2).reshape(-1, cols.shape[1]))
                store[n]["Y"].append(out.movedim(1, -1).reshape(-1, out.shape[1]))
            else:
                store[n]["X"].append(i.reshape(-1, i.shape[-1]))
                store[n]["Y"].append(out.reshape(-1, out.shape[-1]))
        hooks.append(mods[n].register_forward_hook(hook))
    dev = next(model.parameters()).device
    try:
        model.eval()
        for xb in x.split(batch_size):
            model(xb.to(dev))
    finally:
        for h in hooks:
            h.remove()
    return {n: {k: torch.cat(v).double() for k, v in d.items()} for n, d in store.items()}


def _activation_cost(ra: torch.Tensor, rb: torch.Tensor, n: int) -> torch.Tensor:
    a, b = units_view(ra, 1, n), units_view(rb, 1, n)
    return 2 * a @ b.T - a.pow(2).sum(1, keepdim=True) - b.pow(2).sum(1)[None]


def _solve(X: torch.Tensor, Y: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_W ||X W^T - Y||^2 + eps ||W||^2, X with a ones column appended."""
    Xb = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype, device=X.device)], 1)
    G = Xb.T @ Xb
    eps = ridge * float(G.diagonal().mean())
    G.diagonal().add_(max(eps, 1e-12))
    return torch.linalg.solve(G, Xb.T @ Y).T


@register("merge", "pleas", kind="merge-model", config=PleasConfig, regime=Regime.WHOLE_MODEL,
          paper="PLeaS -- Merging Models with Permutations and Least Squares (Nasery et al., 2025)",
          summary="partial permutation merge to a chosen width, then a least-squares refit of every layer")
def pleas(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, cfg: PleasConfig | None = None,
          device=None, **params) -> PleasResult:
    """Merge A and B into one model of width n(1 + r) per hidden layer, fitted on inputs ``x``.

    ``device``: where the forwards, the float64 activation costs and the least-squares refits run
    (None: the CPU; MPS has no float64). The assignments are scipy's and run on the CPU; the merged
    model comes back on the CPU. A and B are not moved (their folded copies are).
    """
    from ..engine.placement import float64_device

    cfg = cfg or PleasConfig(**params)
    dev = float64_device(device)
    t0 = time.perf_counter()
    fa, fb = fold_batchnorm(model_a).to(dev), fold_batchnorm(model_b).to(dev)
    order, reads, writes, spec = _chain(fa)
    ra, rb = _record(fa, order, x, cfg.batch_size), _record(fb, order, x, cfg.batch_size)
    notes = []
    costs, perms = {}, {}
    for name, p in reads.items():
        costs[p] = _activation_cost(ra[name]["raw"], rb[name]["raw"], spec.sizes[p])
    if cfg.matching == "weight":
        from .matching import match_state_dicts

        perms = match_state_dicts(spec, fa.state_dict(), fb.state_dict(), device=dev).perms
    else:
        for p, c in costs.items():  # scipy: on the CPU
            perms[p] = torch.as_tensor(linear_sum_assignment(c.cpu().numpy(), maximize=True)[1], dtype=torch.long)
    # merged unit order per group: [merged A units, A-only units, B-only units (as B indices)]
    plan = {}
    for p, n in spec.sizes.items():
        r = (cfg.ratios or {}).get(p, cfg.ratio)
        if not 0 <= r <= 1:
            raise ConfigError(f"ratio for group '{p}' must be in [0, 1], got {r}")
        perm = perms[p]
        score = costs[p].cpu()[torch.arange(n), perm]
        sep = int(round(r * n))
        worst = torch.argsort(score)[:sep]  # lowest matching scores stay unmerged
        only = torch.zeros(n, dtype=torch.bool)
        only[worst] = True
        m_idx = torch.nonzero(~only).flatten()
        u_idx = torch.nonzero(only).flatten()
        plan[p] = (m_idx.to(dev), u_idx.to(dev), perm.to(dev))  # they index device activations below
    merged = copy.deepcopy(fa)
    mods = dict(merged.named_modules())
    errors = {}
    for name in order:
        layer = mods[name]
        XA, XB, YA, YB = ra[name]["X"], rb[name]["X"], ra[name]["Y"], rb[name]["Y"]
        # columns per input unit: conv patches (k*k) or flattened positions into a Linear
        if name in reads:
            m, u, perm = plan[reads[name]]
            q = XA.shape[1] // spec.sizes[reads[name]]
            cols = lambda idx: (idx[:, None] * q + torch.arange(q, device=dev)).flatten()  # noqa: E731
            X = torch.cat([(XA[:, cols(m)] + XB[:, cols(perm[m])]) / 2, XA[:, cols(u)], XB[:, cols(perm[u])]], 1)
            nm, nu = len(m) * q, len(u) * q
            a_cols = torch.arange(nm + nu, device=dev)
            b_cols = torch.cat([torch.arange(nm, device=dev), torch.arange(nm + nu, nm + 2 * nu, device=dev)])
        else:
            X = XA  # the model input is the same for both
            a_cols = b_cols = torch.arange(X.shape[1], device=dev)
        if name in writes:
            m, u, perm = plan[writes[name]]
            blocks = [((YA[:, m] + YB[:, perm[m]]) / 2, torch.arange(X.shape[1], device=dev)),
                      (YA[:, u], a_cols), (YB[:, perm[u]], b_cols)]
        else:
            blocks = [((YA + YB) / 2, torch.arange(X.shape[1], device=dev))]
        n_out = sum(y.shape[1] for y, _ in blocks)
        W = torch.zeros(n_out, X.shape[1] + 1, dtype=torch.float64, device=dev)
        row, err, tot = 0, 0.0, 0.0
        for Y, allowed in blocks:
            if Y.shape[1] == 0:
                continue
            sol = _solve(X[:, allowed], Y, cfg.ridge)
            W[row:row + Y.shape[1], allowed] = sol[:, :-1]
            W[row:row + Y.shape[1], -1] = sol[:, -1]
            pred = X[:, allowed] @ sol[:, :-1].T + sol[:, -1]
            err += float((pred - Y).pow(2).sum())
            tot += float(Y.pow(2).sum())
            row += Y.shape[1]
        errors[name] = err / max(tot, 1e-300)
        n_in = X.shape[1] if isinstance(layer, nn.Linear) else X.shape[1] // (layer.kernel_size[0] * layer.kernel_size[1])
        new = _like(layer, n_in, n_out).to(dev)
        with torch.no_grad():
            new.weight.copy_(W[:, :-1].reshape(new.weight.shape))
            new.bias.copy_(W[:, -1])
        _set_module(merged, name, new)
    widths = {p: len(m) + 2 * len(u) for p, (m, u, _) in plan.items()}
    params = sum(t.numel() for t in merged.parameters())
    return PleasResult(merged.cpu().eval(), widths, perms, errors, params, time.perf_counter() - t0, notes)


def ratio_for_budget(model: nn.Module, budget: float) -> float:
    """The uniform ratio whose merged model has about ``budget`` x the parameters of one model
    (1.0: one model, about 4.0 for fully unmerged hidden-to-hidden layers)."""
    folded = fold_batchnorm(model)
    order, reads, writes, spec = _chain(folded)
    mods = dict(folded.named_modules())
    base = sum(t.numel() for t in folded.parameters())

    def count(r):
        total = 0
        for name in order:
            w = mods[name].weight
            fin = w[0].numel() * ((1 + r) if name in reads else 1)
            fout = w.shape[0] * ((1 + r) if name in writes else 1)
            total += fin * fout + fout
        return total / base

    if count(0) >= budget:
        return 0.0
    if count(1) <= budget:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(mid) <= budget else (lo, mid)
    return lo
