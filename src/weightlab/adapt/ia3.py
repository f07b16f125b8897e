"""(IA)^3 (Liu et al. 2022): learned vectors that rescale activations, with PEFT's ``IA3`` semantics.

A target layer y = x W^T + b gets one trainable vector l, started at ones (the output is unchanged):
an ordinary module scales its OUTPUT, y' = (x W^T + b) * l (l: one entry per output feature; the
paper's keys and values), a feed-forward module scales its INPUT, y' = (x * l) W^T + b (one entry per
input feature; the paper's l_ff on the MLP's inner activation, which is the input of ``down_proj``).
Which targets are feed-forward: ``feedforward_modules``, name suffixes (or a regex over whole names),
by default PEFT's feed-forward names (``down_proj``, ``fc2``, ...); PEFT's default targets for Llama-like
models are ``k_proj``, ``v_proj``, ``down_proj`` (``default_targets``, used by ``weightlab tune``).

``fold`` is exact in exact arithmetic: W' = diag(l) W (and b' = b * l) for an output scale, W' = W diag(l)
for an input scale (Conv2d: l repeated over each input channel's kernel entries; groups=1 only).
``fold(unload=False)`` keeps W (and b) so that ``unfold`` restores them bit for bit (dividing by l, as
PEFT's unmerge, is lossy and fails for l = 0). PEFT interop: ``ia3_l`` as PEFT saves it, (out, 1) for an
output scale and (1, in) for an input scale (Conv2d (1, n, 1, 1)), with ``peft_type: IA3``,
``target_modules`` and ``feedforward_modules``.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from .layer import AdapterMethod

# PEFT's feed-forward module names (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING), matched as name suffixes
FEEDFORWARD = ["down_proj", "fc2", "fc_out", "w2", "wo", "dense_4h_to_h", "mlp.c_proj"]


class IA3Config(MethodConfig):
    feedforward_modules: list[str] | str = FEEDFORWARD  # suffixes, or a regex over whole module names


def name_matches(name: str, pattern: list[str] | str) -> bool:
    """PEFT's target rule: a regex over the whole name, or a list of suffixes (at a '.' boundary here)."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == s or name.endswith("." + s) for s in pattern)


@register("adapt", "ia3", kind="adapter", regime=Regime.WHOLE_MODEL, config=IA3Config,
          paper="Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context "
                "Learning ((IA)^3, arXiv 2205.05638); PEFT's IA3 semantics",
          summary="learned vectors (init 1) scaling each target's output, or a feed-forward module's input",
          layers="linear, conv1d, conv2d", trainable="out (in for feed-forward modules)")
class IA3(AdapterMethod):
    name = "ia3"
    layer_kinds = ("linear", "conv1d", "conv2d")
    invertible = False  # W' / l is lossy (and undefined at l = 0): fold(unload=False) keeps W to undo it
    default_targets = ("k_proj", "v_proj", "down_proj")
    peft_type = "IA3"

    def feedforward(self, layer) -> bool:
        return name_matches(layer.layer_name, self.cfg.feedforward_modules)

    def create(self, layer, W0, init=True):
        ff = self.feedforward(layer)
        b = layer.base_layer
        if ff and layer.kind == "conv2d" and b.groups != 1:
            raise ConfigError(f"ia3: feed-forward Conv2d '{layer.layer_name}' with groups={b.groups} is not supported")
        n = (b.in_channels if layer.kind == "conv2d" else W0.shape[1]) if ff else W0.shape[0]
        layer.adapter.ia3_l = nn.Parameter(torch.ones(n, dtype=b.weight.dtype))
        layer.adapter.feedforward = ff  # a plain attribute: not a tensor, decided by the name
        return W0

    def _cols(self, layer, l):
        """An input scale over the columns of the (out, in) weight (Conv2d: in x kh x kw)."""
        if layer.kind == "conv2d":
            return l.repeat_interleave(layer.base_layer.weight[0, 0].numel())
        return l

    def delta(self, layer, W):
        l = layer.adapter.ia3_l.float()
        if layer.adapter.feedforward:
            return W * (self._cols(layer, l) - 1)[None, :]
        return W * (l - 1)[:, None]

    def merged_bias(self, layer):
        b = layer.base_layer.bias
        if b is None or layer.adapter.feedforward:
            return None
        return (b.detach().float() * layer.adapter.ia3_l.detach().float()).to(b.dtype)

    def forward(self, layer, x):
        l = layer.adapter.ia3_l
        shape = (1, -1, 1, 1) if layer.kind == "conv2d" else (-1,)
        if layer.adapter.feedforward:  # PEFT: the input in the vector's dtype, scaled, back to the input's dtype
            return layer.base_layer((x.to(l.dtype) * l.view(shape)).to(x.dtype))
        y = layer.base_layer(x)
        return (y * l.view(shape)).to(y.dtype)

    def unmerge(self, layer, Wm):
        l = layer.adapter.ia3_l.float()
        if layer.adapter.feedforward:
            return Wm / self._cols(layer, l)[None, :]
        return Wm / l[:, None]

    def trainable_count(self, out_f, in_f):
        return out_f

    # -- PEFT folders -----------------------------------------------------------------------
    @classmethod
    def peft_export(cls, cfg, per_layer, shared=None):
        """(state dict, config) of a PEFT IA3 folder: ``base_model.model.<name>.ia3_l`` in PEFT's shapes."""
        sd, ff = {}, []
        for n, kind, t, _, _ in per_layer:
            l = t["ia3_l"].reshape(-1)
            is_ff = name_matches(n, cfg.feedforward_modules)
            ff += [n] if is_ff else []
            shape = (1, -1, 1, 1) if kind == "conv2d" else ((1, -1) if is_ff else (-1, 1))
            sd[f"base_model.model.{n}.ia3_l"] = l.reshape(shape).contiguous()
        kinds = {k for _, k, *_ in per_layer}
        conf = {"peft_type": "IA3", "target_modules": sorted(n for n, *_ in per_layer),
                "feedforward_modules": sorted(ff), "fan_in_fan_out": "conv1d" in kinds,
                "init_ia3_weights": True, "modules_to_save": None, "exclude_modules": None}
        return sd, conf

    @classmethod
    def peft_import(cls, model, conf, sd, attach_exact):
        rx = re.compile(r"^(?:base_model\.model\.)?(.+)\.ia3_l(?:\.[^.]+)?(?:\.weight)?$")
        layers = {m.group(1): v for k, v in sd.items() if (m := rx.match(k))}
        if not layers:
            raise ConfigError("the PEFT IA3 adapter holds no ia3_l tensors")
        ffm = conf.get("feedforward_modules") or []
        if isinstance(ffm, list):  # PEFT's rule for lists: a plain suffix test
            ff = [n for n in layers if any(n.endswith(s) for s in ffm)]
        else:
            ff = [n for n in layers if re.fullmatch(ffm, n)]
        wrapped = attach_exact(model, "ia3", list(layers), feedforward_modules=sorted(ff))
        with torch.no_grad():
            for n, v in layers.items():
                wrapped[n].adapter.ia3_l.copy_(v.reshape(-1))
        return model

