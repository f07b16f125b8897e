"""Orthogonal adaptation (Po, Yang, Aberman, Wetzstein, CVPR 2024): concept adapters that sum without crosstalk.

Each concept i trains a LoRA whose input factor is frozen: A_i (r x in) is r rows of one random
orthogonal basis O (in x in) generated from a global ``seed`` that every concept shares, and
concept id i takes rows [i*r, (i+1)*r) of it, so A_i A_j^T = 0 exactly for i != j without the
concepts ever seeing each other. Only B_i (out x r, zero init) trains. Merged weight
W' = W0 + sum_i s B_i A_i; on an input x = A_j^T z from concept j's subspace every other concept's
term vanishes, so the merged layer acts there exactly as concept j's adapter.
``basis="gaussian"`` is the paper's coordination-free variant: A_i ~ N(0, 1/in) seeded by
(seed, concept), only nearly orthogonal in high dimension.

The sum of concept adapters (:func:`orthogonal_sum`, ``weightlab adapter sum``) is itself a LoRA of
rank sum(r_i): [s_1 B_1 | s_2 B_2 | ...] [A_1; A_2; ...], saved as an ``orthogonal`` folder with
``alpha = r`` (s = 1) and the merged concept ids in ``concepts``.
The paper's rank and learning rate were not retrieved; r and alpha default to LoRA's (8, 8).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from .lora import LoRA, lora_scale


class OrthogonalConfig(MethodConfig):
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    concept: int = 0  # which slice of the shared basis this adapter owns
    seed: int = 0  # the global basis seed every concept must share
    basis: Literal["orthogonal", "gaussian"] = "orthogonal"
    concepts: list[int] | None = None  # set on a summed adapter: the concept ids it holds


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random n x n orthogonal matrix (float32) from QR of a seeded Gaussian, float64 math."""
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    # Sign fix: plain QR is not Haar-distributed without it.
    return (Q * torch.sign(torch.diagonal(R))).float()


def concept_basis(in_f: int, r: int, concept: int, seed: int, basis: str = "orthogonal") -> torch.Tensor:
    """A_i (r x in): concept ``concept``'s frozen input factor."""
    if concept < 0:
        raise ConfigError(f"concept id must be >= 0, got {concept}")
    if basis == "gaussian":
        g = torch.Generator().manual_seed(seed * 1_000_003 + concept)
        return torch.randn(r, in_f, generator=g) / math.sqrt(in_f)
    if (concept + 1) * r > in_f:
        raise ConfigError(f"concept {concept} with r={r} needs (concept+1)*r = {(concept + 1) * r} <= {in_f} input "
                          f"features; at most {in_f // r} disjoint concepts fit: lower r or use basis='gaussian'")
    return random_orthogonal(in_f, seed)[:, concept * r:(concept + 1) * r].t().contiguous()


@register("adapt", "orthogonal", kind="adapter", regime=Regime.WHOLE_MODEL, config=OrthogonalConfig,
          paper="Po, Yang, Aberman, Wetzstein 2024, Orthogonal Adaptation for Modular Customization of Diffusion "
                "Models (CVPR 2024)",
          summary="LoRA with a frozen input factor from a disjoint slice of one shared random orthogonal basis; "
                  "concept adapters sum without crosstalk",
          layers="linear, conv1d", trainable="r*out")
class Orthogonal(LoRA):
    name = "orthogonal"
    layer_kinds = ("linear", "conv1d")

    def create(self, layer, W0, init=True):
        out_f, in_f = W0.shape
        r = self.cfg.r
        if r > in_f:
            raise ConfigError(f"orthogonal r={r} exceeds the input size {in_f} of '{layer.layer_name}'")
        dt = layer.base_layer.weight.dtype
        if init and self.cfg.concepts is not None:
            raise ConfigError("a summed orthogonal adapter (concepts=...) is loaded with adapt.load, not trained; "
                              "attach one concept at a time with concept=ID")
        A = concept_basis(in_f, r, self.cfg.concept, self.cfg.seed, self.cfg.basis) if init else torch.zeros(r, in_f)
        # A buffer, not a Parameter: attach() turns on grad for every adapter parameter.
        layer.adapter.register_buffer("lora_A", A.to(dt))
        layer.adapter.lora_B = nn.Parameter(torch.zeros(out_f, r, dtype=dt))
        layer.adapter.drop = nn.Dropout(self.cfg.dropout) if self.cfg.dropout > 0 else nn.Identity()
        return W0

    def trainable_count(self, out_f, in_f):
        return self.cfg.r * out_f


def sum_states(confs: list[dict], states: list[dict[str, torch.Tensor]]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of the summed adapter from concept adapters' (config, tensors)."""
    if len(confs) < 2:
        raise ConfigError("orthogonal sum needs at least two adapters")
    first = confs[0]
    seen: dict[int, int] = {}
    for k, c in enumerate(confs):
        if c.get("method") != "orthogonal":
            raise ConfigError(f"adapter {k} was trained with '{c.get('method')}', not 'orthogonal': plain LoRA "
                              "adapters do not have disjoint subspaces (merge them with weightlab merge instead)")
        cfg = c["config"]
        for key in ("seed", "basis"):
            if cfg[key] != first["config"][key]:
                raise ConfigError(f"adapter {k} uses {key}={cfg[key]!r} but adapter 0 uses "
                                  f"{first['config'][key]!r}: concepts must share one basis")
        if c["targets"] != first["targets"] or c["shapes"] != first["shapes"]:
            raise ConfigError(f"adapter {k} targets other layers or shapes than adapter 0: they were trained on "
                              "different base models or target lists")
        for cid in cfg["concepts"] or [cfg["concept"]]:
            if cid in seen and cfg["basis"] == "orthogonal":
                raise ConfigError(f"adapters {seen[cid]} and {k} both hold concept id {cid}: their subspaces are "
                                  "the same, not disjoint; retrain one with another --param concept=ID")
            seen[cid] = k
    out: dict[str, torch.Tensor] = {}
    for n in first["targets"]:
        As, Bs = [], []
        for c, t in zip(confs, states):
            cfg = c["config"]
            s = lora_scale(cfg["alpha"], t[f"{n}.lora_A"].shape[0], cfg["rslora"])
            As.append(t[f"{n}.lora_A"].float())
            Bs.append(s * t[f"{n}.lora_B"].float())
        dt = states[0][f"{n}.lora_B"].dtype
        out[f"{n}.lora_A"] = torch.cat(As, 0).to(dt).contiguous()
        out[f"{n}.lora_B"] = torch.cat(Bs, 1).to(dt).contiguous()
    r = sum(int(t[f"{first['targets'][0]}.lora_A"].shape[0]) for t in states)
    cfg = dict(first["config"], r=r, alpha=float(r), rslora=False, dropout=0.0, concept=min(seen),
               concepts=sorted(seen))
    return dict(first, config=cfg), out


def orthogonal_sum(paths, out, *, force: bool = False) -> Path:
    """Sum independently trained orthogonal concept adapters (folders) into one adapter folder ``out``."""
    import json

    from safetensors.torch import save_file

    from ..io.atomic import AtomicFolder
    from .api import ADAPTER_FILE, CONFIG_FILE, read_folder

    read = [read_folder(p) for p in paths]
    conf, tensors = sum_states([c for c, _ in read], [t for _, t in read])
    with AtomicFolder(out, force=force, inputs=[Path(p) for p in paths]) as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt", "weightlab.method": "orthogonal",
                                                               "weightlab.sum_of": json.dumps([str(p) for p in paths])})
        (tmp / CONFIG_FILE).write_text(json.dumps(conf, indent=1))
    return Path(out)
