"""Permutation specs as data: which (tensor, axis) pairs each named permutation acts on.

A hidden unit of a network can be renamed without changing the function, as long as every
tensor that reads or writes that unit is reindexed the same way. A spec lists, for each
permutation group, those (tensor, axis) pairs. An axis may be longer than the group: a
Linear after ``flatten`` of C channels x 4 positions has 4C inputs, and attention heads
span head_dim rows each. Such an axis is read as (n, block) with blocks contiguous, which
is the layout of channel-major flatten and of HF head projections.

Perm convention: ``perm[i] = j`` means unit i of the result is unit j of the input, so
applying it is ``index_select(axis, perm)``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError

StateDict = dict[str, torch.Tensor]


@dataclass
class PermutationSpec:
    groups: dict[str, list[tuple[str, int]]]  # perm name -> [(tensor name, axis)]
    sizes: dict[str, int]  # perm name -> number of units
    notes: list[str] = field(default_factory=list)  # what was left unpermuted, and why

    def axes(self) -> dict[str, list[tuple[str, int]]]:
        """tensor name -> [(perm name, axis)]."""
        out: dict[str, list[tuple[str, int]]] = {}
        for p, entries in self.groups.items():
            for t, a in entries:
                out.setdefault(t, []).append((p, a))
        return out

    def validate(self, sd: StateDict) -> None:
        seen: dict[tuple[str, int], str] = {}
        for p, entries in self.groups.items():
            n = self.sizes.get(p)
            if not n:
                raise ConfigError(f"permutation '{p}' has no size; give sizes[{p!r}]")
            for t, a in entries:
                if t not in sd:
                    raise ConfigError(f"permutation '{p}' names tensor '{t}', which the model does not have; "
                                      f"fix the spec or pick the model it was written for")
                shape = sd[t].shape
                if not -len(shape) <= a < len(shape):
                    raise ConfigError(f"permutation '{p}': tensor '{t}' has {len(shape)} axes, no axis {a}")
                a %= len(shape)
                if shape[a] % n:
                    raise ConfigError(f"permutation '{p}' has {n} units but tensor '{t}' axis {a} has {shape[a]} "
                                      f"entries, not a multiple")
                if (t, a) in seen:
                    raise ConfigError(f"tensor '{t}' axis {a} is in two permutations ('{seen[(t, a)]}', '{p}')")
                seen[(t, a)] = p

    def identity(self) -> dict[str, torch.Tensor]:
        return {p: torch.arange(n) for p, n in self.sizes.items()}

    def random(self, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {p: torch.randperm(n, generator=g) for p, n in self.sizes.items()}

    def to_dict(self) -> dict:
        return {"groups": {p: [[t, a] for t, a in e] for p, e in self.groups.items()}, "sizes": self.sizes,
                "notes": self.notes}

    @classmethod
    def from_dict(cls, d: dict) -> "PermutationSpec":
        try:
            groups = {str(p): [(str(t), int(a)) for t, a in e] for p, e in d["groups"].items()}
            sizes = {str(p): int(n) for p, n in d["sizes"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"a permutation spec needs 'groups' {{name: [[tensor, axis], ...]}} and "
                              f"'sizes' {{name: n}}: {e}") from None
        return cls(groups, sizes, list(d.get("notes", [])))

    @classmethod
    def load(cls, path: str | Path) -> "PermutationSpec":
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"spec file '{p}' does not exist")
        text = p.read_text(encoding="utf-8")
        if p.suffix in (".yaml", ".yml"):
            import yaml

            return cls.from_dict(yaml.safe_load(text))
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ConfigError(f"spec file '{p}' is not valid JSON: {e}") from None


def units_view(t: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    """``t`` with ``axis`` moved first and read as n rows (one per unit, blocks kept together)."""
    return t.movedim(axis, 0).reshape(n, -1)


def take(t: torch.Tensor, axis: int, perm: torch.Tensor) -> torch.Tensor:
    n = perm.numel()
    axis %= t.dim()
    block = t.shape[axis] // n
    shape = t.shape
    v = t.reshape(*shape[:axis], n, block, *shape[axis + 1:])
    return v.index_select(axis, perm.to(t.device)).reshape(shape)


def permute_tensor(spec_axes: dict, perms: dict[str, torch.Tensor], name: str, t: torch.Tensor,
                   except_axis: int | None = None) -> torch.Tensor:
    for p, a in spec_axes.get(name, ()):
        if except_axis is not None and a % t.dim() == except_axis % t.dim():
            continue
        t = take(t, a, perms[p])
    return t


def apply_permutation(spec: PermutationSpec, perms: dict[str, torch.Tensor], sd: StateDict) -> StateDict:
    """A new state dict with every listed axis reindexed; other tensors are shared, not copied."""
    axes = spec.axes()
    return {k: permute_tensor(axes, perms, k, v) if k in axes else v for k, v in sd.items()}


def invert(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return inv
