"""BOFT (Liu et al. 2024): orthogonal finetuning with a butterfly-factorized rotation, PEFT's ``BOFT``.

The input is rotated by M = M_{m-1} ... M_1 M_0, m = ``n_butterfly_factor``, each factor
M_l = P_l blockdiag(R_l,1 .. R_l,D) P_l^T: D orthogonal b x b blocks (b * D = in; Conv2d: in x k x k) and a
butterfly permutation P_l that interleaves half-blocks at stride 2^l (P_0 = I: m = 1 is OFT's block-diagonal
rotation), so m factors mix 2^(m-1) blocks' worth of inputs with m * D * b^2 parameters. R = Cayley((A - A^T)/2)
exactly, (I - S)(I + S)^-1, of the trainable ``boft_R`` (m, D, b, b), zero at init; a trainable ``boft_s``
scales each output (ones at init): y = s * (base(x M) - bias) + bias, folded W' = diag(s) W M^T.

- ``block_size`` (PEFT ``boft_block_size``, default 4) or ``block_num`` (``boft_block_num``): exactly one non-zero;
  PEFT's checks (divisibility, even sizes with more than one factor) are ConfigErrors naming the layer.
- ``dropout`` (PEFT ``boft_dropout``): in training, int(p * D) random blocks of one random factor are replaced by
  the identity (PEFT's draws, from torch's global generator); nothing in eval.
- PEFT builds more than one butterfly factor only where its CUDA extension (fbd_cuda) compiles: elsewhere it
  silently uses m = 1. weightlab computes any m on any device (the permutations as index gathers); a folder
  with m > 1 therefore loads in PEFT only where that extension builds.
Forward: the input is rotated factor by factor (gathers and batched b x b products; PEFT forms the dense
in x in M with dense permutation matrices). Conv2d: the rotated, scaled kernel (PEFT's forward).
``fold`` writes W' in float32; ``invertible = False`` (fold with unload=False keeps a copy).
"""
from __future__ import annotations

import math
import re

import torch
from pydantic import model_validator
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from ..tensor.cayley import butterfly_apply, butterfly_perm, cayley
from .layer import AdapterMethod


class BoftConfig(MethodConfig):
    block_size: int = 4
    block_num: int = 0
    n_butterfly_factor: int = 1
    dropout: float = 0.0

    @model_validator(mode="after")
    def _one_of(self):
        if (self.block_size != 0) == (self.block_num != 0):
            raise ValueError(f"give exactly one of block_size ({self.block_size}) and block_num ({self.block_num}) "
                             "(block_size x block_num = the layer's input size); set the other to 0")
        if self.n_butterfly_factor < 1:
            raise ValueError(f"n_butterfly_factor must be >= 1 (1 = OFT), got {self.n_butterfly_factor}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        return self


def boft_layout(d: int, cfg: BoftConfig, name: str) -> tuple[int, int]:
    """(block_num, block_size) for a d-wide input, with PEFT's validity rules as ConfigErrors."""
    k = cfg.n_butterfly_factor - 1  # PEFT's internal count: extra factors
    where = f"BOFT on '{name}' (input size {d})"
    if cfg.block_num:
        D = cfg.block_num
        if d % D:
            raise ConfigError(f"{where}: block_num {D} does not divide the input size")
        if k and (k > int(math.log2(D)) or D % 2 ** k):
            raise ConfigError(f"{where}: block_num {D} must be a multiple of 2^(n_butterfly_factor-1) = {2 ** k}")
        b = d // D
    else:
        b = cfg.block_size
        if d % b:
            raise ConfigError(f"{where}: block_size {b} does not divide the input size")
        if k and d % (b * 2 ** k):
            raise ConfigError(f"{where}: block_size x 2^(n_butterfly_factor-1) = {b * 2 ** k} must divide the "
                              "input size")
        D = d // b
    if k and (D % 2 or b % 2):
        raise ConfigError(f"{where}: with n_butterfly_factor > 1 the block count ({D}) and block size ({b}) must "
                          "both be even")
    return D, b


def block_dropout(R: torch.Tensor, p: float) -> torch.Tensor:
    """PEFT's MultiplicativeDropoutLayer (training): int(p * D) random blocks of one random factor -> identity."""
    N, D, H, _ = R.shape
    n = torch.randint(0, N, (1,)).item()
    k = int(p * D)
    mask = torch.cat([torch.ones(k, device=R.device), torch.zeros(D - k, device=R.device)])
    mask = mask[torch.randperm(D)].view(1, D, 1, 1)
    full = torch.zeros(N, D, 1, 1, device=R.device)
    full[n] = mask
    return (1 - full) * R + full * torch.eye(H, device=R.device).repeat(N, D, 1, 1)


@register("adapt", "boft", kind="adapter", regime=Regime.WHOLE_MODEL, config=BoftConfig,
          paper="Liu et al. 2024, Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization (ICLR 2024, "
                "arXiv 2311.06243); PEFT's BOFT",
          summary="butterfly product of block-diagonal Cayley rotations of each layer's input, plus an output "
                  "scale: W' = diag(s) W M^T",
          layers="linear, conv2d", trainable="n_butterfly_factor * in * block_size + out")
class BOFT(AdapterMethod):
    name = "boft"
    layer_kinds = ("linear", "conv2d")
    invertible = False

    def create(self, layer, W0, init=True):
        b_ = layer.base_layer
        if layer.kind == "conv2d" and (b_.groups > 1 or b_.kernel_size[0] != b_.kernel_size[1]):
            raise ConfigError(f"BOFT on '{layer.layer_name}': PEFT's BOFT handles square, ungrouped kernels only "
                              f"(kernel {tuple(b_.kernel_size)}, groups {b_.groups})")
        d, out_f = W0.shape[1], W0.shape[0]
        D, b = boft_layout(d, self.cfg, layer.layer_name)
        m = self.cfg.n_butterfly_factor
        dt = b_.weight.dtype
        layer.adapter.boft_R = nn.Parameter(torch.zeros(m, D, b, b, dtype=dt))
        # PEFT's shapes: (out, 1) for Linear, (1, out) for Conv2d
        layer.adapter.boft_s = nn.Parameter(torch.ones((1, out_f) if layer.kind == "conv2d" else (out_f, 1),
                                                       dtype=dt))
        layer.adapter.perms = [butterfly_perm(d, D, b, lvl) if m > 1 else torch.arange(d) for lvl in range(m)]
        return W0

    def blocks(self, layer) -> torch.Tensor:
        """The orthogonal blocks (m, D, b, b): exact Cayley of (A - A^T)/2, PEFT's dropout in training."""
        A = layer.adapter.boft_R
        m, D, b, _ = A.shape
        A = A.reshape(m * D, b, b)
        R = cayley(0.5 * (A - A.transpose(1, 2))).reshape(m, D, b, b)
        if self.cfg.dropout > 0 and layer.training:
            R = block_dropout(R, self.cfg.dropout).to(A.dtype)
        return R

    def scale(self, layer) -> torch.Tensor:
        return layer.adapter.boft_s.reshape(-1)

    def _perms(self, layer, device):
        a = layer.adapter
        if a.perms[0].device != device:
            a.perms = [p.to(device) for p in a.perms]
        return a.perms

    def dense_rotation(self, layer) -> torch.Tensor:
        """M (in, in), the input's rotation x -> x M (float32; for checks, the forward never forms it)."""
        d = layer.adapter.perms[0].numel()
        return butterfly_apply(torch.eye(d), self.blocks(layer).float(), self._perms(layer, torch.device("cpu")))

    def rotated_weight(self, layer, W: torch.Tensor) -> torch.Tensor:
        """diag(s) W M^T in W's dtype."""
        R = self.blocks(layer).to(W.dtype)
        return self.scale(layer).to(W.dtype)[:, None] * butterfly_apply(W, R, self._perms(layer, W.device),
                                                                          transpose=True)

    def delta(self, layer, W):
        return self.rotated_weight(layer, W.float()) - W.float()

    def forward(self, layer, x):
        b_ = layer.base_layer
        if layer.kind == "conv2d":
            W = layer.weight_2d()
            return layer.functional(x, self.rotated_weight(layer, W.to(b_.weight.dtype)).to(x.dtype))
        R = self.blocks(layer)
        xr = butterfly_apply(x.to(R.dtype), R, self._perms(layer, x.device)).to(x.dtype)
        y = b_(xr)
        s = self.scale(layer).to(x.dtype)
        if b_.bias is None:
            return y * s
        bias = b_.bias.to(y.dtype)
        return (y - bias) * s + bias  # PEFT's order

    def trainable_count(self, out_f, in_f):
        return self.cfg.n_butterfly_factor * in_f * boft_layout(in_f, self.cfg, "")[1] + out_f

    # -- PEFT folders -----------------------------------------------------------------------
    @classmethod
    def peft_export(cls, cfg, per_layer, shared=None):
        sd = {}
        for n, _, t, _, _ in per_layer:
            sd[f"base_model.model.{n}.boft_R"] = t["boft_R"].contiguous()
            sd[f"base_model.model.{n}.boft_s"] = t["boft_s"].contiguous()
        conf = {"peft_type": "BOFT", "boft_block_size": cfg.block_size, "boft_block_num": cfg.block_num,
                "boft_n_butterfly_factor": cfg.n_butterfly_factor, "boft_dropout": cfg.dropout,
                "target_modules": sorted(n for n, *_ in per_layer), "fan_in_fan_out": False, "bias": "none",
                "exclude_modules": None, "init_weights": True, "layers_to_transform": None,
                "layers_pattern": None, "modules_to_save": None}
        return sd, conf

    @classmethod
    def peft_import(cls, model, conf, sd, attach_exact):
        if conf.get("bias", "none") != "none":
            raise ConfigError(f"PEFT BOFT with bias={conf['bias']!r} (trained biases) is not supported")
        rx = re.compile(r"^(?:base_model\.model\.)?(.+)\.(boft_R|boft_s)(?:\.[^.]+)?(?:\.weight)?$")
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in sd.items():
            if not (m := rx.match(k)):
                raise ConfigError(f"PEFT BOFT tensor {k} is not supported (only boft_R / boft_s)")
            layers.setdefault(m.group(1), {})[m.group(2)] = v
        if not layers or any(set(t) != {"boft_R", "boft_s"} for t in layers.values()):
            raise ConfigError("the PEFT BOFT adapter needs boft_R and boft_s for every layer")
        # PEFT without its CUDA extension trains with one factor whatever the config says: the tensors tell
        factors = {int(t["boft_R"].shape[0]) for t in layers.values()}
        if len(factors) != 1:
            raise ConfigError(f"PEFT BOFT layers with different butterfly factor counts {sorted(factors)}")
        wrapped = attach_exact(model, "boft", list(layers), block_size=int(conf.get("boft_block_size") or 0),
                               block_num=int(conf.get("boft_block_num") or 0), n_butterfly_factor=factors.pop(),
                               dropout=float(conf.get("boft_dropout") or 0.0))
        with torch.no_grad():
            for n, t in layers.items():
                a = wrapped[n].adapter
                for k in ("boft_R", "boft_s"):
                    if tuple(t[k].shape) != tuple(getattr(a, k).shape):
                        raise ConfigError(f"PEFT BOFT layer {n}: {k} {tuple(t[k].shape)}, the config gives "
                                          f"{tuple(getattr(a, k).shape)}")
                    getattr(a, k).copy_(t[k])
        return model
