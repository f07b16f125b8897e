"""Rich vs lazy learning: how much a training run changed a network's weights, tangent kernel and
representations (Liu et al., How connectivity structure shapes rich and lazy learning in neural circuits,
ICLR 2024, arXiv 2310.08513). Smaller change = lazier learning.

- relative weight change ||W_T - W_0||_F / ||W_0||_F (per matrix and over all matrices), with the
  effective rank (Roy & Vetterli, ``tensor.spectral.effective_rank``) of W_0 and of the change;
- empirical neural tangent kernel on a probe batch: K_ij = sum_k <d f_k(x_i)/d theta, d f_k(x_j)/d theta>
  (trace over the outputs), and the kernel distance S = 1 - <K_0, K_T>_F / (||K_0||_F ||K_T||_F);
- representation alignment: the same normalized inner product of the Gram matrices H H^T of a layer's
  representations before and after (1 = same geometry), and the kernel-target alignment <K, y y^T>;
- ``lowrank_init``: the paper's rank-k initial connectivity at a given Frobenius norm, optionally with
  its column/row spaces taken from given (task-aligned) directions.

The per-example Jacobians cost n x outputs x parameters floats: keep the probe small (<= 64 examples).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..tensor.spectral import effective_rank

MAX_JACOBIAN_FLOATS = 200_000_000  # ~800 MB in float32: beyond it ask for a smaller probe


def kernel_alignment(K1, K2) -> float:
    """<K1, K2>_F / (||K1||_F ||K2||_F) in float64 (1 for proportional kernels, scale-invariant)."""
    a, b = torch.as_tensor(K1, dtype=torch.float64), torch.as_tensor(K2, dtype=torch.float64)
    if a.shape != b.shape:
        raise ConfigError(f"kernel alignment needs two kernels on the same probe: shapes {tuple(a.shape)} "
                          f"and {tuple(b.shape)}")
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        raise ConfigError("kernel alignment of an all-zero kernel is undefined (the model's outputs do not "
                          "depend on its trainable parameters on this probe?)")
    return float((a * b).sum() / (na * nb))


def kernel_distance(K0, K1) -> float:
    """S = 1 - <K0, K1>_F / (||K0||_F ||K1||_F): 0 when the kernel only rescaled (lazy), up to 1 (rich)."""
    return 1.0 - kernel_alignment(K0, K1)


def _gram(H, center: bool) -> torch.Tensor:
    H = torch.as_tensor(H, dtype=torch.float64).reshape(len(H), -1)
    if center:
        H = H - H.mean(dim=0, keepdim=True)
    return H @ H.t()


def representation_alignment(H0, H1, center: bool = False) -> float:
    """Alignment of the representational Gram matrices H0 H0^T and H1 H1^T of the same n examples
    (rows); ``center=True`` centers the features first (linear CKA)."""
    if len(H0) != len(H1):
        raise ConfigError(f"representation alignment needs the same examples: {len(H0)} vs {len(H1)} rows")
    return kernel_alignment(_gram(H0, center), _gram(H1, center))


def target_alignment(K, y) -> float:
    """Kernel-target alignment <K, Y Y^T> / (||K|| ||Y Y^T||), y: (n,) or (n, k) targets (one-hot for classes)."""
    Y = torch.as_tensor(y, dtype=torch.float64).reshape(len(y), -1)
    return kernel_alignment(K, Y @ Y.t())


def _trainable(model: nn.Module, params) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    if params is None:
        out = {n: p for n, p in named.items() if p.requires_grad}
    else:
        missing = [n for n in params if n not in named]
        if missing:
            raise ConfigError(f"parameters {missing[:3]} are not in the model (names: {list(named)[:5]} ...)")
        out = {n: named[n] for n in params}
    if not out:
        raise ConfigError("the model has no trainable parameters to take a tangent kernel over")
    return out


def empirical_ntk(model: nn.Module, x: torch.Tensor, params=None) -> torch.Tensor:
    """n x n empirical tangent kernel (float64) of ``model`` on the probe ``x`` (n examples along dim 0),
    over ``params`` (names; default all trainable parameters), summed over the outputs.

    The model's mode (train/eval) is used as is and nothing in it is changed; call ``model.eval()``
    first if it has dropout or batch norm."""
    from torch.func import functional_call, jacrev, vmap

    x = torch.as_tensor(x)
    ps = {n: p.detach() for n, p in _trainable(model, params).items()}
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in ps}
    rest.update(dict(model.named_buffers()))
    with torch.no_grad():
        n_out = functional_call(model, {**ps, **rest}, (x[:1],)).numel()
    size = len(x) * n_out * sum(p.numel() for p in ps.values())
    if size > MAX_JACOBIAN_FLOATS:
        raise ConfigError(f"the probe's Jacobian would hold {size:.3g} floats ({len(x)} examples x {n_out} "
                          f"outputs x parameters): use fewer probe examples or pass params=[...] names")

    def f(p, xi):
        return functional_call(model, {**p, **rest}, (xi.unsqueeze(0),)).reshape(-1)

    J = vmap(jacrev(f), in_dims=(None, 0))(ps, x)
    K = torch.zeros(len(x), len(x), dtype=torch.float64)
    for j in J.values():
        j = j.reshape(len(x), n_out, -1).double()
        K += torch.einsum("iap,jap->ij", j, j)
    return K


def _matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.dim() >= 2}


def weight_change(model0: nn.Module, model1: nn.Module) -> dict:
    """Relative Frobenius change of every weight matrix (and of all of them together), with the effective
    rank of W_0 and of W_T - W_0."""
    w0, w1 = _matrices(model0), _matrices(model1)
    if set(w0) != set(w1) or any(w0[n].shape != w1[n].shape for n in w0):
        raise ConfigError("weight change needs two models of the same architecture (parameter names/shapes differ)")
    bad = [n for n in w0 if not (torch.isfinite(w0[n]).all() and torch.isfinite(w1[n]).all())]
    if bad:
        raise ConfigError(f"weights {bad[:3]} are not finite (NaN/inf): the run diverged; lower the learning rate")
    rows, num, den = [], 0.0, 0.0
    for n in w0:
        a, b = w0[n].double().reshape(len(w0[n]), -1), w1[n].double().reshape(len(w1[n]), -1)
        d = b - a
        dn, an = float(d.norm()), float(a.norm())
        num, den = num + dn ** 2, den + an ** 2
        rows.append({"name": n, "rel_change": dn / an if an else math.inf,
                     "effective_rank_init": effective_rank(a) if an else 0.0,
                     "effective_rank_change": effective_rank(d) if dn else 0.0})
    return {"total_rel_change": math.sqrt(num / den) if den else math.inf, "matrices": rows}


def laziness(model0: nn.Module, model1: nn.Module, x: torch.Tensor, params=None, features=None, y=None) -> dict:
    """All the laziness measures of one run (model0 = the initial network, model1 = the trained one) on a
    probe ``x``: relative weight change, kernel distance, and, when ``features(model, x) -> H`` is given,
    the representation alignment of H; with targets ``y`` the kernel-target alignment before and after."""
    K0, K1 = empirical_ntk(model0, x, params), empirical_ntk(model1, x, params)
    out = weight_change(model0, model1)
    out["kernel_distance"] = kernel_distance(K0, K1)
    if features is not None:
        with torch.no_grad():
            out["representation_alignment"] = representation_alignment(features(model0, x), features(model1, x))
    if y is not None:
        out["target_alignment_init"], out["target_alignment_final"] = target_alignment(K0, y), target_alignment(K1, y)
    return out


def lowrank_init(n_out: int, n_in: int, rank: int, fro_norm: float, generator: torch.Generator | None = None,
                 left: torch.Tensor | None = None, right: torch.Tensor | None = None) -> torch.Tensor:
    """A rank-``rank`` matrix U diag(s) V^T with Frobenius norm ``fro_norm``: U, V random orthonormal
    (or the first ``rank`` columns of ``left``/``right``, orthonormalized: a task-aligned low-rank init),
    s the sorted singular values of a Gaussian matrix of that shape (so rank = min(n_out, n_in) is a
    random full-rank init with the same norm)."""
    k = min(n_out, n_in)
    if not 1 <= rank <= k:
        raise ConfigError(f"rank {rank} must be in 1..{k} for a {n_out} x {n_in} matrix")
    if fro_norm <= 0:
        raise ConfigError(f"fro_norm must be > 0 (got {fro_norm})")

    def basis(n, given):
        if given is not None:
            if given.shape[0] != n or given.shape[1] < rank:
                raise ConfigError(f"aligned directions need shape ({n}, >= {rank}); got {tuple(given.shape)}")
            return torch.linalg.qr(given[:, :rank].double())[0]
        return torch.linalg.qr(torch.randn(n, rank, generator=generator, dtype=torch.float64))[0]

    s = torch.linalg.svdvals(torch.randn(n_out, n_in, generator=generator, dtype=torch.float64))[:rank]
    W = basis(n_out, left) @ torch.diag(s) @ basis(n_in, right).t()
    return (W * (fro_norm / W.norm())).float()
