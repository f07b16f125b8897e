"""One adapter-layer wrapper for every method, and the hooks a method implements.

A method is one class deriving from :class:`AdapterMethod` (one file per method). It never
copies layer plumbing: :class:`AdapterLayer` wraps any supported base layer (``nn.Linear``,
transformers' ``Conv1D``, ``nn.Conv2d`` where the method allows), keeps the base frozen and
calls the method's hooks:

- ``create(layer, W0, init)``: register trainable parameters (and frozen buffers) on
  ``layer.adapter`` and return the frozen base weight the adapter works on, in (out, in)
  layout and float32 (``W0`` itself, or a residual such as PiSSA's ``W0 - s B A``).
  ``init=False`` (loading a saved adapter) only creates tensors of the right shapes;
  ``rebase(layer, W0)`` then recomputes the base from the loaded tensors.
- ``delta(layer, W)``: the dense update dW (out, in) so that the merged weight is W + dW.
- ``forward(layer, x)``: the adapter forward; the default is base(x) + ``delta_forward``.
- ``unmerge(layer, Wm)``: the base weight from a merged one, where invertible.
- ``regularizer(layer)``: a per-layer term (SORSA), weighted by the method.
- ``peft_factors(tensors, cfg, W)``: (B, A) with dW = B @ A for a PEFT LoRA on the original base.
- ``prepare(model, names, cfg)`` (classmethod, once per ``attach``): state shared by all the
  layers (VeRA's shared random projections), set as ``method.shared`` on each layer's method;
  ``shared_state`` / ``load_shared_state``: what of it a saved adapter keeps (once).
- ``merged_bias(layer)``: the bias after a fold, for methods that also change it ((IA)^3 scaling
  an output); ``None`` (the default) leaves the bias as it is.

Weights are handled in the (out, in) layout of ``nn.Linear`` whatever the layer type; Conv1D
(in, out) is transposed and Conv2d flattened to (out, in*kh*kw) at the boundary.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def layer_kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return "linear"
    if _is_conv1d(m):
        return "conv1d"
    if isinstance(m, nn.Conv2d):
        return "conv2d"
    return None


def get_weight_2d(m: nn.Module) -> torch.Tensor:
    """The layer's weight in (out, in) layout (a view where possible)."""
    k = layer_kind(m)
    w = m.weight
    if k == "conv1d":
        return w.t()
    if k == "conv2d":
        return w.reshape(w.shape[0], -1)
    return w


def set_weight_2d(m: nn.Module, w2d: torch.Tensor) -> None:
    """Write an (out, in) weight back into the layer, in the layer's own layout and dtype."""
    if hasattr(m, "set_weight_2d"):  # a layer that stores its weight itself (a QuantLinear re-quantizes it)
        m.set_weight_2d(w2d)
        return
    k = layer_kind(m)
    w = m.weight
    if k == "conv1d":
        w2d = w2d.t()
    elif k == "conv2d":
        w2d = w2d.reshape(w.shape)
    with torch.no_grad():
        w.copy_(w2d.to(w.dtype))


class AdapterMethod:
    """Hooks of one adaptation method. Subclasses set ``name`` and ``layer_kinds``."""

    name: ClassVar[str] = ""
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d")
    materialize: ClassVar[bool] = False  # forward builds W' (no low-rank shortcut)
    changes_base: ClassVar[bool] = False  # the frozen base is a residual, not W0
    invertible: ClassVar[bool] = True  # merge can be undone from the merged weight alone
    default_targets: ClassVar[tuple[str, ...] | None] = None  # `tune` without --targets ((IA)^3: PEFT's)

    def __init__(self, cfg):
        self.cfg = cfg
        self.shared = None  # what ``prepare`` returned for this attach

    @classmethod
    def prepare(cls, model: nn.Module, names: list[str], cfg) -> Any:
        """State shared by every layer of one ``attach`` (before any layer is wrapped); None by default."""
        return None

    def shared_state(self) -> dict[str, torch.Tensor]:
        """Tensors of ``shared`` that a saved adapter must keep (once, not per layer); none by default."""
        return {}

    def load_shared_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put saved ``shared_state`` tensors back (in place: the layers may hold views of them)."""

    def merged_bias(self, layer: "AdapterLayer") -> torch.Tensor | None:
        """The bias a fold writes (methods that scale the output also scale the bias); None: unchanged."""
        return None

    # -- hooks ------------------------------------------------------------------
    def create(self, layer: "AdapterLayer", W0: torch.Tensor, init: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def rebase(self, layer: "AdapterLayer", W0: torch.Tensor) -> torch.Tensor:
        """Base weight after loading saved tensors (only methods that change the base override this)."""
        return W0

    def delta(self, layer: "AdapterLayer", W: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_forward(self, layer: "AdapterLayer", x: torch.Tensor) -> torch.Tensor:
        """Adapter contribution for a linear-like layer; default: x dW^T (materialized)."""
        W = layer.weight_2d()
        return F.linear(x, self.delta(layer, W.float()).to(x.dtype))

    def forward(self, layer: "AdapterLayer", x: torch.Tensor) -> torch.Tensor:
        base = layer.base_layer
        if self.materialize or layer.kind == "conv2d":
            W = layer.weight_2d()
            Wm = (W.float() + self.delta(layer, W.float())).to(x.dtype)
            return layer.functional(x, Wm)
        return base(x) + self.delta_forward(layer, x)

    def unmerge(self, layer: "AdapterLayer", Wm: torch.Tensor) -> torch.Tensor:
        return Wm - self.delta(layer, Wm)  # exact only for W-independent deltas; others override

    def regularizer(self, layer: "AdapterLayer") -> torch.Tensor | None:
        return None

    def regularizer_weight(self) -> float:
        return 1.0

    def on_step(self, layer: "AdapterLayer", step: int, total_steps: int) -> None:
        """Called after optimizer step ``step`` (1-based) of ``total_steps``: schedules, re-selection."""

    @classmethod
    def on_model_step(cls, layers: list["AdapterLayer"], step: int, total_steps: int) -> None:
        """All of a model's layers of this method at once, for decisions across layers (global pruning)."""
        for layer in layers:
            layer.method.on_step(layer, step, total_steps)

    def trainable_count(self, out_f: int, in_f: int) -> int:
        raise NotImplementedError

    def original_weight(self, layer: "AdapterLayer") -> torch.Tensor:
        """W0 (float32, (out, in)) the adapter was attached to; methods that change the base override."""
        return layer.weight_2d().float()

    @classmethod
    def peft_factors(cls, t: dict[str, torch.Tensor], cfg, W0: torch.Tensor | None, svd_rank: int | None):
        """(B, A) float32 with dW = B @ A relative to the ORIGINAL base weight W0."""
        raise NotImplementedError

    @staticmethod
    def make_optimizer(params, lr: float, cfg, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


DEFAULT = "default"
_NAME = re.compile(r"[A-Za-z0-9_-]+")


def slot(adapter_name: str) -> str:
    """The submodule that holds a named adapter's tensors: ``adapter`` for "default" (the names every
    single-adapter model has always had), ``adapter_<name>`` for the others."""
    return "adapter" if adapter_name == DEFAULT else f"adapter_{adapter_name}"


def check_adapter_name(adapter_name: str) -> str:
    if not isinstance(adapter_name, str) or not _NAME.fullmatch(adapter_name):
        raise ConfigError(f"adapter name {adapter_name!r} is not valid: use letters, digits, '_' or '-' "
                          "(it becomes a module name, so no '.')")
    return adapter_name


class AdapterLayer(nn.Module):
    """``AdapterLayer(base_layer, method)``: the base layer frozen, one or more named adapters on it.

    Each adapter has its method (``methods[name]``) and its tensors (a submodule, see :func:`slot`).
    The method hooks read ``layer.adapter`` / ``layer.method``: they resolve to the adapter being
    worked on (``with layer.using(name)``), else to the first active one, so methods written for
    one adapter per layer need no change. Only the active adapters that are not folded contribute to
    the forward; several active adapters add their updates over the same frozen base:
    y = base(x) + sum_i (f_i(x) - base(x)), which for additive updates (LoRA, LoHa, LoKr, VeRA) is
    PEFT's sum of the adapters' terms.
    """

    def __init__(self, base_layer: nn.Module, method: AdapterMethod, name: str = "", init: bool = True,
                 adapter_name: str = DEFAULT):
        super().__init__()
        kind = layer_kind(base_layer)
        if kind is None or kind not in method.layer_kinds:
            raise ConfigError(f"adapter '{method.name}' does not support layer '{name}' of type "
                              f"{type(base_layer).__name__} (supported: {', '.join(method.layer_kinds)})")
        self.base_layer = base_layer
        self.kind = kind
        self.layer_name = name
        self.methods: dict[str, AdapterMethod] = {}
        self.active: list[str] = [adapter_name]
        self.merged_names: list[str] = []
        self._merge_stack: list[tuple[list[str], torch.Tensor | None, torch.Tensor | None]] = []
        self._current: str | None = None
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.add(adapter_name, method, init)

    # -- named adapters -------------------------------------------------------------------
    def check_add(self, adapter_name: str, method: AdapterMethod) -> None:
        """Raise the error ``add`` would raise, changing nothing (``attach`` checks every layer first)."""
        check_adapter_name(adapter_name)
        where = f"layer '{self.layer_name}'"
        if self.kind not in method.layer_kinds:
            raise ConfigError(f"adapter '{method.name}' does not support {where} ({type(self.base_layer).__name__}); "
                              f"choose targets among {', '.join(method.layer_kinds)} layers")
        if adapter_name in self.methods:
            raise ConfigError(f"{where} already has an adapter named '{adapter_name}'")
        if self.merged_names:
            raise ConfigError(f"{where} has folded adapters {self.merged_names}: unfold before adding '{adapter_name}'")
        if self.methods and (method.changes_base or any(m.changes_base for m in self.methods.values())):
            other = method.name if method.changes_base else next(m.name for m in self.methods.values()
                                                                 if m.changes_base)
            raise ConfigError(f"{where}: '{other}' replaces the frozen base weight by a residual, so it cannot "
                              f"share the layer with another adapter ({sorted(self.methods)} + '{adapter_name}')")

    def add(self, adapter_name: str, method: AdapterMethod, init: bool = True) -> None:
        """Create adapter ``adapter_name`` of ``method`` on this layer (its tensors from the current base)."""
        self.check_add(adapter_name, method)
        self._modules[slot(adapter_name)] = nn.Module()  # not add_module: the ``adapter`` property shadows it
        self.methods[adapter_name] = method
        with self.using(adapter_name), torch.no_grad():
            W0 = get_weight_2d(self.base_layer).detach().float()
            Wb = method.create(self, W0, init=init)
            if Wb is not W0:
                set_weight_2d(self.base_layer, Wb)
        self._modules[slot(adapter_name)].to(self.base_layer.weight.device)

    def remove(self, adapter_name: str) -> None:
        del self._modules[slot(adapter_name)]
        del self.methods[adapter_name]
        self.active = [n for n in self.active if n != adapter_name]
        self.merged_names = [n for n in self.merged_names if n != adapter_name]

    def adapter_module(self, adapter_name: str) -> nn.Module:
        return self._modules[slot(adapter_name)]

    def set_active(self, names: list[str]) -> None:
        self.active = [n for n in names if n in self.methods]

    @contextmanager
    def using(self, adapter_name: str):
        """``layer.adapter`` / ``layer.method`` are adapter ``adapter_name``'s inside the block."""
        prev, self._current = self._current, adapter_name
        try:
            yield self
        finally:
            self._current = prev

    @property
    def current(self) -> str:
        if self._current is not None:
            return self._current
        return next((n for n in self.active if n in self.methods), None) or next(iter(self.methods))

    @property
    def adapter(self) -> nn.Module:
        return self._modules[slot(self.current)]

    @property
    def method(self) -> AdapterMethod:
        return self.methods[self.current]

    @property
    def merged(self) -> bool:
        return bool(self.merged_names)

    @merged.setter
    def merged(self, value: bool) -> None:
        if value and not self.merged_names:
            self.merged_names = list(self.active)
            self._merge_stack.append((list(self.active), None, None))
        elif not value:
            self.merged_names, self._merge_stack = [], []

    # -- shape helpers ------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return get_weight_2d(self.base_layer).shape[0]

    @property
    def in_features(self) -> int:
        return get_weight_2d(self.base_layer).shape[1]

    def weight_2d(self) -> torch.Tensor:
        return get_weight_2d(self.base_layer)

    def functional(self, x: torch.Tensor, W2d: torch.Tensor) -> torch.Tensor:
        """The base layer's op with another (out, in) weight."""
        b = self.base_layer
        bias = b.bias.to(x.dtype) if b.bias is not None else None
        if self.kind == "conv2d":
            return F.conv2d(x, W2d.reshape(b.weight.shape), bias, b.stride, b.padding, b.dilation, b.groups)
        return F.linear(x, W2d, bias)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        live = [n for n in self.active if n in self.methods and n not in self.merged_names]
        if not live:
            return self.base_layer(x, *args, **kwargs)
        if len(live) == 1:  # the one-adapter path, unchanged
            with self.using(live[0]):
                return self.method.forward(self, x)
        base = self.base_layer(x, *args, **kwargs)
        y = base
        for n in live:
            with self.using(n):
                y = y + (self.method.forward(self, x) - base)
        return y

    def merged_weight(self, names: list[str] | None = None) -> torch.Tensor:
        """W' = W + sum of the adapters' dW (each on the same W) in float32, (out, in); default: the current one."""
        W = self.weight_2d().detach().float()
        with torch.no_grad():
            dW = None
            for n in names or [self.current]:
                with self.using(n):
                    d = self.method.delta(self, W)
                dW = d if dW is None else dW + d
            return W + dW

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.adapter.state_dict())

    def extra_repr(self) -> str:
        ads = ", ".join(f"{n}={m.name}" for n, m in self.methods.items())
        return f"adapters=[{ads}], active={self.active}, kind={self.kind}, merged={self.merged_names}"


def rank_of(r: int, out_f: int, in_f: int) -> int:
    return max(1, min(r, out_f, in_f))
