"""Permutation specs without torch.fx: the chain of layers as it runs on one example input.

Forward hooks on every leaf module record the order in which they run. Read as a chain, each
Linear/Conv starts a group on its output units and the next Linear/Conv reads that group on
its input axis; per-channel modules in between (BatchNorm, 1-D LayerNorm, activations,
pooling, dropout, flatten) join the group of what feeds them. The last group reaches the
output and stays unpermuted. This covers Sequential-like MLP/CNN chains whose forward has
Python control flow that fx cannot trace. It cannot see functional ops in forward
(residual adds, reshapes), so the derived spec is then checked: a randomly permuted copy
must compute the same outputs on the example input, or the spec is refused.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import ConfigError
from .spec import PermutationSpec, apply_permutation

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)


def example_input(model: nn.Module) -> torch.Tensor:
    """A small random batch shaped for the first layer that holds weights."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return torch.randn(8, m.in_features, generator=g)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return torch.randn(8, m.in_channels, *[16] * (m.weight.dim() - 2), generator=g)
        if isinstance(m, nn.Embedding):
            return torch.randint(0, m.num_embeddings, (8, 16), generator=g)
    raise ConfigError(f"{type(model).__name__} has no Linear, Conv or Embedding layer to guess an input from; "
                      f"pass example= (one input batch) or a hand spec")


@torch.no_grad()
def run_order(model: nn.Module, example) -> list[tuple[str, nn.Module]]:
    """Leaf modules in the order they run on ``example`` (eval mode)."""
    calls: list[tuple[str, nn.Module]] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: calls.append((n, mod)))
             for n, m in model.named_modules() if not any(True for _ in m.children())]
    was = model.training
    model.eval()
    try:
        model(*example) if isinstance(example, tuple) else model(example)
    except Exception as e:  # any failure of the user's forward: say which input was tried
        raise ConfigError(f"running {type(model).__name__} on an example input of shape "
                          f"{list(getattr(example, 'shape', []))} failed ({type(e).__name__}: {e}); pass example= "
                          f"(one input batch) or a hand spec") from None
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return calls


def spec_from_hooks(model: nn.Module, example=None, check_seed: int = 0) -> PermutationSpec:
    example = example_input(model) if example is None else example
    calls = run_order(model, example)
    names = [n for n, _ in calls]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"module '{twice[0]}' runs more than once (shared weights); the hook walk needs a plain "
                          f"chain, write a hand spec")
    ran = set(names)
    idle = [n for n, m in model.named_modules()
            if n not in ran and not any(True for _ in m.children()) and any(True for _ in m.parameters(recurse=False))]
    if idle:
        raise ConfigError(f"module '{idle[0]}' holds weights but did not run on the example input, so the hook walk "
                          f"cannot tell what it reads; pass an example that runs it, or a hand spec")
    own = set(model.state_dict())
    groups: dict[str, list[tuple[str, int]]] = {}
    sizes: dict[str, int] = {}
    notes = ["derived from the order modules ran on one example input (torch.fx could not trace the model)"]
    cur: str | None = None  # group of the value flowing down the chain; None: unpermutable

    def present(prefix, *leaves):
        return [f"{prefix}.{s}" for s in leaves if f"{prefix}.{s}" in own]

    def stop(why):
        nonlocal cur
        if cur is not None:
            notes.append(f"{cur}: {why}")
            del groups[cur], sizes[cur]  # nothing read it as a permutable input yet
        cur = None

    for n, m in calls:
        if isinstance(m, _PRODUCERS) and getattr(m, "groups", 1) == 1:
            width = m.in_features if isinstance(m, nn.Linear) else m.in_channels
            if cur is not None:
                if width % sizes[cur] or (not isinstance(m, nn.Linear) and width != sizes[cur]):
                    stop(f"'{n}' reads {width} inputs, not {sizes[cur]} channels")
                else:
                    groups[cur].append((f"{n}.weight", 1))
            cur = n
            groups[n] = [(t, 0) for t in present(n, "weight", "bias")]
            sizes[n] = m.weight.shape[0]
        elif isinstance(m, _PRODUCERS) and m.groups == m.in_channels == m.out_channels:
            if cur is not None:
                groups[cur] += [(t, 0) for t in present(n, "weight", "bias")]
        elif isinstance(m, nn.Embedding) and cur is None:
            cur = n
            groups[n], sizes[n] = [(f"{n}.weight", 1)], m.weight.shape[1]
        elif isinstance(m, _NORMS):
            width = m.num_features if not isinstance(m, nn.LayerNorm) else (
                m.normalized_shape[0] if len(m.normalized_shape) == 1 else -1)
            if cur is not None:
                if width != sizes[cur]:
                    stop(f"norm '{n}' is not over its {sizes[cur]} channels")
                else:
                    groups[cur] += [(t, 0) for t in present(n, "weight", "bias", "running_mean", "running_var")]
        elif _channelwise(m):
            continue
        else:
            stop(f"passes through {type(m).__name__} '{n}'")
    stop("reaches the model output")
    spec = PermutationSpec({p: e for p, e in groups.items() if e}, {p: sizes[p] for p in groups if groups[p]}, notes)
    _check_invariance(model, spec, example, check_seed)
    return spec


def _channelwise(m: nn.Module) -> bool:
    from .derive import _CHANNELWISE_MODULES

    return isinstance(m, _CHANNELWISE_MODULES) or (isinstance(m, nn.Flatten) and m.start_dim == 1)


@torch.no_grad()
def _check_invariance(model: nn.Module, spec: PermutationSpec, example, seed: int) -> None:
    """Permuting by the spec must not change the outputs; hooks cannot see residual adds or reshapes."""
    if not spec.groups:
        return
    other = copy.deepcopy(model).eval()
    sd = apply_permutation(spec, spec.random(seed), model.state_dict())
    other.load_state_dict({k: v.clone() for k, v in sd.items()})
    was = model.training
    model.eval()
    try:
        run = (lambda m: m(*example)) if isinstance(example, tuple) else (lambda m: m(example))
        want, got = run(model), run(other)
    finally:
        model.train(was)
    want = want if isinstance(want, torch.Tensor) else getattr(want, "logits", None)
    got = got if isinstance(got, torch.Tensor) else getattr(got, "logits", None)
    if want is None or got is None:
        raise ConfigError(f"{type(model).__name__} returns no tensor to check the derived spec against; "
                          f"write a hand spec")
    scale = float(want.abs().max()) or 1.0
    if want.shape != got.shape or float((want - got).abs().max()) > 1e-4 * scale:
        raise ConfigError(f"the chain read from {type(model).__name__}'s module order is not its data flow (a "
                          f"permuted copy computes different outputs: residual adds or reshapes in forward?); "
                          f"write a hand spec (PermutationSpec or a JSON spec file) and pass spec=")
