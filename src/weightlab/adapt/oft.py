"""OFT (Qiu et al. 2023): orthogonal finetuning, with PEFT's (>= 0.18) ``OFT`` semantics.

The layer's input is rotated by a block-diagonal orthogonal matrix: y = base(x BD), BD = blockdiag(R_1 .. R_r),
r blocks of size b with r * b = in (Conv2d: in x kh x kw, one flattened kernel). The folded weight is
W' = W BD^T: every output neuron's weight vector turns by the same rotation, so the angles between neurons
(the paper's hyperspherical energy) are kept. R_i = Cayley(S_i) of a skew-symmetric S_i whose strict upper
triangle is the trainable ``oft_R`` row i (b(b-1)/2 numbers per block, zero at init: R = I, output unchanged).

- ``block_size`` (PEFT ``oft_block_size``, default 32) or ``blocks`` (PEFT ``r``; exactly one of the two is
  non-zero). A block size that does not divide the input is moved to the nearest divisor with a warning,
  PEFT's rule (``adjust_oft_parameters``), so the same config gives PEFT's per-layer shapes.
- ``cayley_neumann`` (default True, PEFT's): R = I + 2S + 2S^2 + 2S^3 + S^4 (``neumann_terms`` = 5), PEFT's
  truncated series, only approximately orthogonal and turning the other way than the exact form;
  ``cayley_neumann=False``: the exact R = (I - S)(I + S)^-1 (the paper's Cayley transform).
- ``coft`` (constrained OFT): before each use, each block's S is scaled down in place (no gradient) to
  Frobenius norm eps / sqrt(stored blocks) when larger (PEFT's projection; eps 6e-5).
- ``block_share``: one block (1 x b(b-1)/2 parameters) used for every block of the layer.

Forward as PEFT (Linear): the input, in the parameters' dtype, times BD, back to its dtype, through the base
layer. Conv2d: the rotated kernel W' (the paper's form and PEFT's merge; PEFT 0.21's unmerged Conv2d forward
sums overlapping rotated patches with F.fold and so differs from its own merge for kernels > 1).
``fold`` writes W' in float32; W cannot be recovered bit for bit from W' (``invertible = False``: fold with
unload=False keeps a copy). PEFT folders both ways (``oft_R.weight``, ``peft_type: OFT``). PEFT's
``module_dropout`` is not applied by PEFT's OFT forward either, and is not a parameter here.
"""
from __future__ import annotations

import re
import warnings

import torch
from pydantic import model_validator
from torch import nn

from ..errors import ConfigError
from ..registry import MethodConfig, Regime, register
from ..tensor.cayley import block_diag, block_rotate, block_size_of, cayley, coft_project, skew_from_upper
from .layer import AdapterMethod

PEFT_MIN_VERSION = "0.18.0"  # the first PEFT with this Cayley-Neumann series (older OFT folders differ)


class OftConfig(MethodConfig):
    block_size: int = 32
    blocks: int = 0
    cayley_neumann: bool = True
    neumann_terms: int = 5
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False

    @model_validator(mode="after")
    def _one_of(self):
        if (self.block_size != 0) == (self.blocks != 0):
            raise ValueError(f"give exactly one of block_size ({self.block_size}) and blocks ({self.blocks}) "
                             "(block_size x blocks = the layer's input size); set the other to 0")
        if self.block_size < 0 or self.blocks < 0:
            raise ValueError("block_size and blocks must be >= 0")
        return self


def nearest_divisor(n: int, want: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the divisor of n nearest ``want`` (the lower one on a tie); n if want >= n."""
    if want >= n:
        return n
    hi = want
    while hi <= n and n % hi:
        hi += 1
    lo = want
    while lo > 1 and n % lo:
        lo -= 1
    return lo if want - lo <= hi - want else hi


def block_layout(d: int, block_size: int, blocks: int, name: str = "") -> tuple[int, int]:
    """(blocks, block size) of a d-wide input, PEFT's rule (one of block_size / blocks given)."""
    if block_size:
        b = block_size
        if d % b:
            b = nearest_divisor(d, b)
            warnings.warn(f"OFT: block_size {block_size} does not divide the input size {d} of '{name}'; "
                          f"using {b} (PEFT's adjustment)", stacklevel=4)
        return d // b, b
    r = blocks
    if d % r:
        r = nearest_divisor(d, r)
        warnings.warn(f"OFT: {blocks} blocks do not divide the input size {d} of '{name}'; using {r} "
                      "(PEFT's adjustment)", stacklevel=4)
    return r, d // r


@register("adapt", "oft", kind="adapter", regime=Regime.WHOLE_MODEL, config=OftConfig,
          paper="Qiu et al. 2023, Controlling Text-to-Image Diffusion by Orthogonal Finetuning (NeurIPS 2023, "
                "arXiv 2306.07280); PEFT's OFT (>= 0.18, Cayley-Neumann by default)",
          summary="block-diagonal orthogonal rotation (Cayley of skew blocks) of each layer's input: W' = W R^T",
          layers="linear, conv2d", trainable="blocks * b(b-1)/2 (block_share: b(b-1)/2)")
class OFT(AdapterMethod):
    name = "oft"
    layer_kinds = ("linear", "conv2d")
    invertible = False  # W BD^T -> W needs a solve (and the series is not exactly orthogonal): keep a copy

    def create(self, layer, W0, init=True):
        c = self.cfg
        b_ = layer.base_layer
        if layer.kind == "conv2d" and (b_.groups > 1 or b_.kernel_size[0] != b_.kernel_size[1]):
            raise ConfigError(f"OFT on '{layer.layer_name}': PEFT's OFT handles square, ungrouped kernels only "
                              f"(kernel {tuple(b_.kernel_size)}, groups {b_.groups})")
        r, b = block_layout(W0.shape[1], c.block_size, c.blocks, layer.layer_name)
        if b < 2:
            raise ConfigError(f"OFT on '{layer.layer_name}': block size {b} has no free parameter; "
                              "use a block size >= 2")
        stored = 1 if c.block_share else r
        layer.adapter.oft_R = nn.Parameter(torch.zeros(stored, b * (b - 1) // 2, dtype=b_.weight.dtype))
        layer.adapter.block = b  # plain attributes: fixed by the layout, not saved tensors
        layer.adapter.blocks = r
        return W0

    def rotation(self, layer) -> torch.Tensor:
        """The orthogonal blocks (stored blocks, b, b) from the current parameters (COFT projects them first)."""
        a, c = layer.adapter, self.cfg
        if c.coft:
            with torch.no_grad():  # PEFT: the parameter itself is projected, outside the graph
                a.oft_R.copy_(coft_project(a.oft_R, a.block, c.eps))
        S = skew_from_upper(a.oft_R, a.block)
        return cayley(S, c.neumann_terms if c.cayley_neumann else None)

    def dense_rotation(self, layer) -> torch.Tensor:
        """BD (in, in), the input's rotation x -> x BD (float32; for checks, the forward never forms it)."""
        a = layer.adapter
        return block_diag(self.rotation(layer).float(), a.blocks)

    def rotated_weight(self, layer, W: torch.Tensor) -> torch.Tensor:
        """W BD^T in W's dtype (rows of W turned by the transposed blocks)."""
        return block_rotate(W, self.rotation(layer).to(W.dtype), transpose=True)

    def delta(self, layer, W):
        return self.rotated_weight(layer, W.float()) - W.float()

    def forward(self, layer, x):
        if layer.kind == "conv2d":
            W = layer.weight_2d()
            return layer.functional(x, self.rotated_weight(layer, W.to(layer.adapter.oft_R.dtype)).to(x.dtype))
        R = self.rotation(layer)
        return layer.base_layer(block_rotate(x.to(R.dtype), R).to(x.dtype))

    def unmerge(self, layer, Wm):
        R = self.rotation(layer).float()  # W = W' (BD^T)^-1 = W' blockdiag(R^-T), block by block
        return block_rotate(Wm.float(), torch.linalg.inv(R).transpose(-2, -1))

    def trainable_count(self, out_f, in_f):
        r, b = block_layout(in_f, self.cfg.block_size, self.cfg.blocks)
        return (1 if self.cfg.block_share else r) * b * (b - 1) // 2

    # -- PEFT folders -----------------------------------------------------------------------
    @classmethod
    def peft_export(cls, cfg, per_layer, shared=None):
        sd = {f"base_model.model.{n}.oft_R.weight": t["oft_R"].contiguous() for n, _, t, _, _ in per_layer}
        conf = {"peft_type": "OFT", "r": cfg.blocks, "oft_block_size": cfg.block_size, "module_dropout": 0.0,
                "target_modules": sorted(n for n, *_ in per_layer), "fan_in_fan_out": False, "bias": "none",
                "exclude_modules": None, "init_weights": True, "layers_to_transform": None,
                "layers_pattern": None, "modules_to_save": None, "coft": cfg.coft, "eps": cfg.eps,
                "block_share": cfg.block_share, "use_cayley_neumann": cfg.cayley_neumann,
                "num_cayley_neumann_terms": cfg.neumann_terms, "peft_version": PEFT_MIN_VERSION}
        return sd, conf

    @classmethod
    def peft_import(cls, model, conf, sd, attach_exact):
        if "oft_block_size" not in conf or any(".oft_r." in k for k in sd):
            raise ConfigError("this PEFT OFT adapter was written by PEFT < 0.14 (another parameterization); "
                              "retrain it with a newer PEFT (PEFT itself no longer loads it)")
        if conf.get("bias", "none") != "none":
            raise ConfigError(f"PEFT OFT with bias={conf['bias']!r} (trained biases) is not supported")
        rx = re.compile(r"^(?:base_model\.model\.)?(.+)\.oft_R(?:\.[^.]+)?\.weight$")
        layers = {}
        for k, v in sd.items():
            if m := rx.match(k):
                layers[m.group(1)] = v
            else:
                raise ConfigError(f"PEFT OFT tensor {k} is not supported (only Linear/Conv2d oft_R.weight)")
        if not layers:
            raise ConfigError("the PEFT OFT adapter holds no oft_R tensors")
        if conf.get("use_cayley_neumann", True):
            from packaging.version import Version

            if Version(str(conf.get("peft_version") or "0.0.0").partition("@")[0]) < Version(PEFT_MIN_VERSION):
                warnings.warn("this PEFT OFT adapter predates PEFT 0.18's Cayley-Neumann series; it is read with "
                              "the new series, as PEFT reads it", stacklevel=2)
        wrapped = attach_exact(model, "oft", list(layers), block_size=int(conf.get("oft_block_size") or 0),
                               blocks=int(conf.get("r") or 0), coft=bool(conf.get("coft", False)),
                               eps=float(conf.get("eps", 6e-5)), block_share=bool(conf.get("block_share", False)),
                               cayley_neumann=bool(conf.get("use_cayley_neumann", True)),
                               neumann_terms=int(conf.get("num_cayley_neumann_terms", 5)))
        with torch.no_grad():
            for n, v in layers.items():
                p = wrapped[n].adapter.oft_R
                if tuple(v.shape) != tuple(p.shape):
                    raise ConfigError(f"PEFT OFT layer {n}: oft_R {tuple(v.shape)} (block size "
                                      f"{block_size_of(v.shape[-1])}), the config gives {tuple(p.shape)}")
                p.copy_(v)
        return model
