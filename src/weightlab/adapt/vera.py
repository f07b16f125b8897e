"""VeRA (Kopiczko et al. 2024): vector-based random matrix adaptation, with PEFT's ``VERA`` semantics.

dW = diag(lambda_b) B diag(lambda_d) A with A (r x in) and B (out x r) frozen random matrices SHARED by
all the targets of one ``attach``, and only the two vectors trained: lambda_d (r, started at
``d_initial`` = 0.1) and lambda_b (out, started at 0, so the output is unchanged at init). As PEFT, one
A (r x in_max) and one B (out_max x r) are drawn for the largest target shape, kaiming-uniform
(U(-sqrt(6/fan_in), +sqrt(6/fan_in))) from a CPU generator seeded with ``projection_prng_key``, A first,
and each layer uses the slices A[:, :in] and B[:out, :]. The forward is PEFT's,
y = base(x) + lambda_b * ((lambda_d * (drop(x) A^T)) B^T). Defaults are PEFT's (r=256, d_initial=0.1,
key 0, dropout 0); ``weightlab tune`` passes its ``--rank`` (16 by default) as r.

The projections are views of the shared tensors (one copy in memory), saved once in weightlab's own adapter
file (``_shared.vera_A`` / ``_shared.vera_B``: an imported adapter's projections need not be the key's); PEFT
export writes them as
``base_model.vera_A`` / ``base_model.vera_B`` when ``save_projection`` (PEFT's default, true), and import
takes them from the file when present. Linear and HF Conv1D layers (PEFT: the same). ``fold`` adds dW
(W-independent, so ``unfold`` subtracts it).
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from .layer import AdapterMethod, get_weight_2d, layer_kind


class VeraConfig(MethodConfig):
    r: int = 256
    d_initial: float = 0.1
    projection_prng_key: int = 0
    save_projection: bool = True  # PEFT export: write vera_A / vera_B (else PEFT regenerates them from the key)
    dropout: float = 0.0


def _kaiming_uniform(shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """PEFT's ``_kaiming_init``: U(-b, b) with b = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=g)


def projections(shapes, cfg, device=None) -> dict[str, torch.Tensor]:
    """The shared A (r x in_max) and B (out_max x r) for targets of these (out, in) shapes."""
    if not shapes:
        raise ConfigError("vera: no target layers")
    out_max = max(s[0] for s in shapes)
    in_max = max(s[1] for s in shapes)
    g = torch.Generator(device="cpu").manual_seed(cfg.projection_prng_key)
    A = _kaiming_uniform((cfg.r, in_max), g)
    B = _kaiming_uniform((out_max, cfg.r), g)
    return {"A": A.to(device), "B": B.to(device)}


@register("adapt", "vera", kind="adapter", regime=Regime.WHOLE_MODEL, config=VeraConfig,
          paper="Kopiczko et al. 2024, VeRA: Vector-based Random Matrix Adaptation (arXiv 2310.11454); "
                "PEFT's VERA semantics (shared projections from projection_prng_key)",
          summary="frozen shared random A, B; trains only the scaling vectors: dW = diag(lb) B diag(ld) A",
          layers="linear, conv1d", trainable="out + r")
class VeRA(AdapterMethod):
    name = "vera"
    layer_kinds = ("linear", "conv1d")
    peft_type = "VERA"

    @classmethod
    def prepare(cls, model, names, cfg):
        mods = [model.get_submodule(n) for n in names]
        shapes = [tuple(get_weight_2d(m).shape) for m in mods if layer_kind(m) in cls.layer_kinds]
        return projections(shapes, cfg, device=mods[0].weight.device) if shapes else None

    @classmethod
    def prepare_shapes(cls, shapes: dict[str, tuple[int, int]], cfg):
        """The shared projections from saved (out, in) shapes (export of a saved folder: no model)."""
        return projections(list(shapes.values()), cfg)

    def shared_state(self):
        return {"vera_A": self.shared["A"], "vera_B": self.shared["B"]}

    def load_shared_state(self, tensors):
        with torch.no_grad():
            for k, key in (("A", "vera_A"), ("B", "vera_B")):
                if key in tensors:
                    if tensors[key].shape != self.shared[k].shape:
                        raise ConfigError(f"vera: saved {key} of shape {tuple(tensors[key].shape)}, the targets need "
                                          f"{tuple(self.shared[k].shape)}")
                    self.shared[k].copy_(tensors[key])  # the layers' buffers are views: they follow

    def create(self, layer, W0, init=True):
        out_f, in_f = W0.shape
        a, dt = layer.adapter, layer.base_layer.weight.dtype
        a.register_buffer("vera_A", self.shared["A"][:, :in_f], persistent=False)  # views of the shared tensors
        a.register_buffer("vera_B", self.shared["B"][:out_f, :], persistent=False)
        a.lambda_b = nn.Parameter(torch.zeros(out_f, dtype=dt))
        a.lambda_d = nn.Parameter(torch.full((self.cfg.r,), self.cfg.d_initial if init else 0.0, dtype=dt))
        a.drop = nn.Dropout(self.cfg.dropout) if self.cfg.dropout > 0 else nn.Identity()
        return W0

    def delta(self, layer, W):
        a = layer.adapter
        return (a.lambda_b.float()[:, None] * a.vera_B.float()) @ (a.lambda_d.float()[:, None] * a.vera_A.float())

    def delta_forward(self, layer, x):
        a = layer.adapter
        dt = a.lambda_d.dtype
        h = F.linear(a.drop(x.to(dt)), a.vera_A.to(x.device, dt))
        return (a.lambda_b * F.linear(a.lambda_d * h, a.vera_B.to(x.device, dt))).to(x.dtype)

    def trainable_count(self, out_f, in_f):
        return out_f + self.cfg.r

    # -- PEFT folders -----------------------------------------------------------------------
    @classmethod
    def peft_export(cls, cfg, per_layer, shared=None):
        sd = {}
        for n, _, t, _, _ in per_layer:
            sd[f"base_model.model.{n}.vera_lambda_b"] = t["lambda_b"].contiguous()
            sd[f"base_model.model.{n}.vera_lambda_d"] = t["lambda_d"].contiguous()
        if cfg.save_projection:
            sd["base_model.vera_A"] = shared["A"].detach().float().cpu().contiguous()
            sd["base_model.vera_B"] = shared["B"].detach().float().cpu().contiguous()
        conf = {"peft_type": "VERA", "r": cfg.r, "target_modules": sorted(n for n, *_ in per_layer),
                "projection_prng_key": cfg.projection_prng_key, "save_projection": cfg.save_projection,
                "vera_dropout": cfg.dropout, "d_initial": cfg.d_initial,
                "fan_in_fan_out": any(k == "conv1d" for _, k, *_ in per_layer), "bias": "none",
                "init_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None}
        return sd, conf

    @classmethod
    def peft_import(cls, model, conf, sd, attach_exact):
        rx = re.compile(r"^(?:base_model\.model\.)?(.+)\.vera_lambda_([bd])(?:\.[^.]+)?(?:\.weight)?$")
        layers: dict[str, dict[str, torch.Tensor]] = {}
        proj = {}
        for k, v in sd.items():
            if m := rx.match(k):
                layers.setdefault(m.group(1), {})[m.group(2)] = v
            elif m := re.match(r"^(?:base_model\.)?vera_([AB])(?:\.[^.]+)?$", k):
                proj[m.group(1)] = v
        if not layers:
            raise ConfigError("the PEFT VeRA adapter holds no vera_lambda_b/vera_lambda_d tensors")
        wrapped = attach_exact(model, "vera", list(layers), r=int(conf["r"]),
                               projection_prng_key=int(conf.get("projection_prng_key", 0)),
                               d_initial=float(conf.get("d_initial", 0.1)),
                               save_projection=bool(conf.get("save_projection", True)), dropout=0.0)
        with torch.no_grad():
            for n, t in layers.items():
                a = wrapped[n].adapter
                a.lambda_b.copy_(t["b"].reshape(-1))
                a.lambda_d.copy_(t["d"].reshape(-1))
                if "A" in proj:  # into the shared tensors (the buffers are views of them)
                    a.vera_A.copy_(proj["A"][: a.vera_A.shape[0], : a.vera_A.shape[1]])
                if "B" in proj:
                    a.vera_B.copy_(proj["B"][: a.vera_B.shape[0], : a.vera_B.shape[1]])
        return model
