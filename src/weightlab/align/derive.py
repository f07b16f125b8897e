"""Permutation specs derived from the module itself (``spec="auto"``).

The module is traced with torch.fx and each value's channel axis is given a group: a
Linear/Conv/Embedding starts a new group on its output units; per-channel layers
(BatchNorm, LayerNorm, activations, pooling, dropout, flatten from dim 1) keep it; adding
or multiplying two values joins their groups (a residual stream is one group). A group that
reaches the model's output, its input, or any operation not known to be channel-wise is
frozen: it stays unpermuted, which is always safe. What was frozen is said in spec.notes.

HF Llama-style decoders and BERT encoders get hand-written specs (see transformer.py),
since their attention reshapes cannot be followed by this walk. Models that fx cannot trace
(Python control flow on data) fall back to the order their layers run in (derive_hooks.py).
"""
from __future__ import annotations

import operator

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from .spec import PermutationSpec

_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Mish,
    nn.Hardswish, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
_CHANNELWISE_FUNCTIONS = {
    torch.relu, F.relu, F.gelu, F.silu, torch.tanh, torch.sigmoid, F.leaky_relu, F.elu, F.dropout, F.max_pool1d,
    F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
    operator.neg, torch.neg,
}
_CHANNELWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "neg"}
_JOINING = {operator.add, operator.iadd, torch.add, operator.sub, torch.sub, operator.mul, operator.imul, torch.mul}
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)


class _Groups:
    """Union-find over channel groups; group 0 is the frozen group."""

    def __init__(self):
        self.parent = [0]
        self.entries: list[list[tuple[str, int]]] = [[]]
        self.size = [0]
        self.name = ["<frozen>"]
        self.why: list[str] = []

    def new(self, name: str, size: int) -> int:
        self.parent.append(len(self.parent))
        self.entries.append([])
        self.size.append(size)
        self.name.append(name)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.size[a] and self.size[b] and self.size[a] != self.size[b]:
            raise ConfigError(f"groups '{self.name[a]}' ({self.size[a]} units) and '{self.name[b]}' "
                              f"({self.size[b]} units) are added together but differ in size")
        if b == 0 or (a != 0 and b < a):  # frozen wins; otherwise the earlier producer names the group
            a, b = b, a
        self.parent[b] = a
        self.entries[a] += self.entries[b]
        self.entries[b] = []
        return a

    def add(self, g: int, tensor: str, axis: int) -> None:
        self.entries[self.find(g)].append((tensor, axis))

    def freeze(self, g: int, why: str) -> None:
        r = self.find(g)
        if r != 0:
            self.why.append(f"{self.name[r]}: {why}")
            self.union(0, r)


def spec_from_module(model: nn.Module, example=None) -> PermutationSpec:
    """Derive a spec by tracing ``model`` (see the module docstring for the rules); models that
    fx cannot trace fall back to the run order of their layers on ``example`` (derive_hooks)."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types for untraceable Python control flow
        from .derive_hooks import spec_from_hooks

        try:
            return spec_from_hooks(model, example)
        except ConfigError as e2:
            raise ConfigError(f"cannot derive a permutation spec for {type(model).__name__}: torch.fx cannot trace "
                              f"it ({str(e).splitlines()[0] if str(e) else type(e).__name__}), and the forward-hook "
                              f"walk failed: {e2}") from None
    return _spec_from_graph(model, gm)


def _spec_from_graph(model: nn.Module, gm) -> PermutationSpec:
    mods = dict(gm.named_modules())
    params = {k for k, _ in model.named_parameters()} | {k for k, _ in model.named_buffers()}
    G = _Groups()
    env: dict[torch.fx.Node, int] = {}

    def g_of(a) -> int:
        return env.get(a, 0) if isinstance(a, torch.fx.Node) else 0

    def tensor_args(node):
        out = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a))
        return out

    def present(*names):
        return [n for n in names if n in params]

    for node in gm.graph.nodes:
        op, tgt = node.op, node.target
        if op == "placeholder" or op == "get_attr":
            env[node] = 0
        elif op == "output":
            for a in tensor_args(node):
                G.freeze(g_of(a), "reaches the model output")
        elif op == "call_module":
            m, gin = mods[tgt], g_of(node.args[0])
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                grouped = getattr(m, "groups", 1)
                if grouped == 1:
                    G.add(gin, f"{tgt}.weight", 1)
                    out = G.new(tgt, m.weight.shape[0])
                    for t in present(f"{tgt}.weight", f"{tgt}.bias"):
                        G.add(out, t, 0)
                    env[node] = out
                elif grouped == m.in_channels == m.out_channels:  # depthwise: one filter per channel
                    for t in present(f"{tgt}.weight", f"{tgt}.bias"):
                        G.add(gin, t, 0)
                    env[node] = gin
                else:
                    G.freeze(gin, f"grouped conv {tgt}")
                    env[node] = 0
            elif isinstance(m, nn.Embedding):
                env[node] = G.new(tgt, m.weight.shape[1])
                G.add(env[node], f"{tgt}.weight", 1)
            elif isinstance(m, _NORMS):
                if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) != 1:
                    G.freeze(gin, f"LayerNorm {tgt} over several axes")
                    env[node] = 0
                    continue
                for t in present(*(f"{tgt}.{s}" for s in ("weight", "bias", "running_mean", "running_var"))):
                    G.add(gin, t, 0)
                env[node] = gin
            elif isinstance(m, _CHANNELWISE_MODULES) or (isinstance(m, nn.Flatten) and m.start_dim == 1):
                env[node] = gin
            else:
                for a in tensor_args(node):
                    G.freeze(g_of(a), f"passes through {type(m).__name__} {tgt}")
                env[node] = 0
        elif op == "call_function":
            if tgt in _JOINING:
                g = 0
                nodes = [a for a in node.args if isinstance(a, torch.fx.Node)]
                g = g_of(nodes[0]) if nodes else 0
                for a in nodes[1:]:
                    g = G.union(g, g_of(a))
                env[node] = G.find(g)
            elif tgt in _CHANNELWISE_FUNCTIONS or (tgt is torch.flatten and _start_dim(node) == 1):
                env[node] = g_of(node.args[0])
            else:
                for a in tensor_args(node):
                    G.freeze(g_of(a), f"passes through {getattr(tgt, '__name__', tgt)}")
                env[node] = 0
        elif op == "call_method":
            if tgt in _CHANNELWISE_METHODS or (tgt == "flatten" and _start_dim(node) == 1):
                env[node] = g_of(node.args[0])
            elif tgt in ("add", "sub", "mul", "add_", "mul_"):
                g = g_of(node.args[0])
                for a in node.args[1:]:
                    if isinstance(a, torch.fx.Node):
                        g = G.union(g, g_of(a))
                env[node] = G.find(g)
            elif tgt in ("size", "dim"):
                env[node] = 0
            else:
                if G.find(g_of(node.args[0])) != 0:
                    G.freeze(g_of(node.args[0]), f"passes through .{tgt}()")
                env[node] = 0

    groups, sizes = {}, {}
    for g in range(1, len(G.parent)):
        if G.find(g) == g and G.entries[g]:
            groups[G.name[g]] = list(dict.fromkeys(G.entries[g]))
            sizes[G.name[g]] = G.size[g]
    return PermutationSpec(groups, sizes, G.why)


def module_order(model: nn.Module, example=None) -> list[str]:
    """Names of the leaf modules in the order forward calls them (fx graph, else one run)."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # untraceable control flow: watch one run instead
        from .derive_hooks import run_order, example_input

        return [n for n, _ in run_order(model, example_input(model) if example is None else example)]
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def _start_dim(node) -> int:
    if len(node.args) > 1:
        return node.args[1]
    return node.kwargs.get("start_dim", 0)


def resolve_spec(model: nn.Module, spec, example=None) -> PermutationSpec:
    """``spec``: a PermutationSpec, a path to a JSON/YAML spec file, or "auto" (``example``: an
    input batch for models that torch.fx cannot trace)."""
    if isinstance(spec, PermutationSpec):
        return spec
    if spec in (None, "auto"):
        from .transformer import hf_spec

        cfg = getattr(model, "config", None)
        if cfg is not None and getattr(cfg, "model_type", None):
            return hf_spec(model)
        return spec_from_module(model, example)
    if isinstance(spec, dict):
        return PermutationSpec.from_dict(spec)
    return PermutationSpec.load(spec)
