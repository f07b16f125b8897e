"""Activation and KV-cache quantization (W8A8, FP8): calibrating static scales, and fake-quantizing at run time.

What llm-compressor's QuantizationModifier does with ``input_activations`` and ``kv_cache_scheme``:

- ``dynamic`` inputs (CT strategy 'token'): nothing to calibrate; each token's scale is max |x| / 127.5 (int8)
  or / 448 (FP8) at run time.
- ``static`` inputs (strategy 'tensor'): one scale per Linear from the calibration inputs, max |x| over all of
  them (observer ``static_minmax``, the FP8 preset's) or llm-compressor's moving average of the per-batch
  extremes (``minmax``, its default for int8 inputs and the KV cache).
- KV cache, FP8 per tensor, static: keys after RoPE and values as the attention hands them to the cache
  (``cache.update``); llm-compressor taps the same call (compressed-tensors' QuantizedKVCache).

The calibration pass (``observe_block``) runs the block once on its cached inputs after any transform
(SmoothQuant's smoothing) and before its weights are quantized, with forward pre-hooks on the target Linears
and a tap in place of the attention's cache; the block computes in full precision, as llm-compressor calibrates
(its quantization is disabled until calibration ends). ``fake_quant`` installs the same hooks to evaluate a model
with its activations and KV cache quantized as compressed-tensors' forward (or vLLM) would.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..tensor.quant8 import fake_quantize, fake_quantize_tokens, observed_absmax, scale_from_absmax

ACTIVATIONS = ("none", "dynamic", "static")
OBSERVERS = ("static_minmax", "minmax")
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")  # transformers >= 5.25 renamed it 'cache'


@dataclass
class ActScheme:
    """How a quantized model's activations run: ``inputs`` none/dynamic/static, the observer of static scales,
    the grid type of the activations (int8 with int weights, FP8 with FP8 weights), FP8 KV cache or not."""

    inputs: Literal["none", "dynamic", "static"] = "none"
    observer: Literal["static_minmax", "minmax"] = "static_minmax"
    kind: Literal["int", "float"] = "int"
    kv_cache: bool = False

    def __post_init__(self):
        if self.inputs not in ACTIVATIONS:
            raise ConfigError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {self.inputs!r}")
        if self.observer not in OBSERVERS:
            raise ConfigError(f"observer must be one of {', '.join(OBSERVERS)}, got {self.observer!r}")

    @property
    def active(self) -> bool:
        return self.inputs != "none" or self.kv_cache

    @property
    def calibrates(self) -> bool:
        return self.inputs == "static" or self.kv_cache


@dataclass
class KVRange:
    """The calibrated max |k| and max |v| of one attention module (CT ``k_scale``/``v_scale`` = them / 448)."""

    k_absmax: torch.Tensor
    v_absmax: torch.Tensor

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        return scale_from_absmax(self.k_absmax, "float"), scale_from_absmax(self.v_absmax, "float")


def attention_modules(root: nn.Module, prefix: str = "") -> dict:
    """Modules with Linear children k_proj and v_proj (Llama-family attention), by qualified name."""
    out = {}
    for n, m in root.named_modules():
        if isinstance(getattr(m, "k_proj", None), nn.Linear) and isinstance(getattr(m, "v_proj", None), nn.Linear):
            out[f"{prefix}.{n}" if prefix and n else (prefix or n)] = m
    return out


class _CacheTap:
    """Stands in for the KV cache the attention writes its keys/values to: ``on_kv(k, v)`` may replace them; a
    real cache passed by the caller still receives them."""

    def __init__(self, on_kv, inner=None):
        self.on_kv, self.inner = on_kv, inner

    def update(self, key_states, value_states, *args, **kwargs):
        key_states, value_states = self.on_kv(key_states, value_states)
        if self.inner is not None:
            return self.inner.update(key_states, value_states, *args, **kwargs)
        return key_states, value_states

    def __getattr__(self, name):  # anything else a model reads from its cache
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


def tap_kv(attn: nn.Module, on_kv, keep_cache: bool = True):
    """A forward pre-hook that hands ``attn`` a _CacheTap as its cache argument; returns the handle.
    ``keep_cache=False`` drops a cache found in the arguments (a calibration replay would grow it, as AWQ's)."""
    params = inspect.signature(attn.forward).parameters
    names = [n for n in CACHE_KWARGS if n in params]
    if not names:
        raise ConfigError(f"{type(attn).__name__}.forward takes no cache argument ({', '.join(CACHE_KWARGS)}), so its "
                          "keys and values cannot be observed; quantize without the KV cache")

    def hook(mod, args, kwargs):
        inner = next((kwargs.pop(n) for n in CACHE_KWARGS if kwargs.get(n) is not None), None)
        for n in CACHE_KWARGS:
            kwargs.pop(n, None)
        kwargs[names[0]] = _CacheTap(on_kv, inner if keep_cache else None)
        return args, kwargs

    return attn.register_forward_pre_hook(hook, with_kwargs=True)


def _extremes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = torch.aminmax(x.detach())
    return lo.float().cpu(), hi.float().cpu()


@torch.no_grad()
def observe_block(run, layers: dict, scheme: ActScheme) -> tuple[dict, dict]:
    """One pass of the block over its cached inputs: (input max |x| per target layer when static,
    KVRange per attention module when the KV cache is quantized); per-batch extremes folded by the observer."""
    seen: dict = {}
    hooks = []

    def record(key):
        def add(x):
            lo, hi = _extremes(x)
            acc = seen.setdefault(key, ([], []))
            acc[0].append(lo)
            acc[1].append(hi)
        return add

    mods = dict(run.block.named_modules())
    try:
        if scheme.inputs == "static":
            for local, m in mods.items():
                q = run.qualified(local)
                if q in layers:
                    fn = record(q)
                    hooks.append(m.register_forward_pre_hook(lambda mod, args, fn=fn: fn(args[0])))
        if scheme.kv_cache:
            for q, attn in attention_modules(run.block, run.name).items():
                fk, fv = record((q, "k")), record((q, "v"))
                hooks.append(tap_kv(attn, lambda k, v, fk=fk, fv=fv: (fk(k), fv(v), (k, v))[2], keep_cache=False))
        for j in range(len(run)):
            run.forward(j)
    finally:
        for h in hooks:
            h.remove()
    fold = {key: observed_absmax(lo, hi, scheme.observer) for key, (lo, hi) in seen.items()}
    inputs = {k: v for k, v in fold.items() if isinstance(k, str)}
    kv = {q: KVRange(fold[(q, "k")], fold[(q, "v")]) for q in {k[0] for k in fold if isinstance(k, tuple)}}
    return inputs, kv


@contextlib.contextmanager
def fake_quant(model: nn.Module, quantized: dict, scheme: ActScheme):
    """Inside the block, ``model``'s quantized Linears see their inputs fake-quantized (dynamic per token, or
    static with the calibrated scale) and its attention modules a fake-quantized FP8 KV cache, as compressed-
    tensors' forward runs a W8A8/FP8 checkpoint. ``quantized``: the report's layers (and KVRange entries)."""
    mods = dict(model.named_modules())
    hooks = []

    def quant_input(q):
        if scheme.inputs == "dynamic":
            return lambda mod, args: (fake_quantize_tokens(args[0], scheme.kind), *args[1:])
        s = scale_from_absmax(q.input_absmax, scheme.kind)
        return lambda mod, args: (fake_quantize(args[0], s.to(args[0].device), scheme.kind), *args[1:])

    try:
        for name, q in quantized.items():
            if isinstance(q, KVRange):
                ks, vs = q.scales()
                hooks.append(tap_kv(mods[name], lambda k, v, ks=ks, vs=vs: (
                    fake_quantize(k, ks.to(k.device), "float"), fake_quantize(v, vs.to(v.device), "float"))))
            elif scheme.inputs != "none" and name in mods:
                hooks.append(mods[name].register_forward_pre_hook(quant_input(q)))
        yield model
    finally:
        for h in hooks:
            h.remove()
