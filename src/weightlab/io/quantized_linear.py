"""A Linear that keeps its compressed-tensors codes packed: adapters on a 4-bit base (QLoRA-style).

``QuantLinear`` holds exactly what a compressed-tensors (CT) ``pack-quantized`` symmetric layer stores
(``weight_packed`` int32, ``weight_scale``, ``weight_shape``: its buffers carry CT's names) and dequantizes
on every forward; no full-precision copy is kept. It derives from ``nn.Linear`` and ``weight`` is a
read-only property giving the dequantized matrix, so every code that treats a layer as linear (adapter
attach, target selection) works on it unchanged. The dequantized value is the one every reader sees:
``(q * s)`` in float32 rounded to the scales' dtype (``io/quantized.py``, transformers' CT loader), then
cast to the compute dtype.

Training memory: a frozen ``F.linear(x, W)`` would keep each layer's dequantized W alive until backward;
``_DequantLinear`` saves nothing and dequantizes again in backward for the input gradient (the base
gets no gradient), so a forward-backward holds one layer's dense W at a time.

``set_weight_2d`` (called by the adapter fold through ``adapt.layer.set_weight_2d``) re-quantizes, as
PEFT's merge into a bitsandbytes 4-bit layer does: round-to-nearest on the layer's symmetric grid and
group size with fresh scales, except that every (row, group) whose values did not change keeps its
codes and scale bit for bit (re-rounding a grid point with a new scale would move it).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError, MissingDependencyError, UnsupportedFormatError

BITS = (4, 8)  # what weightlab writes and vLLM serves; byte-aligned codes unpack without a bit stream


class _DequantLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantized on the fly; backward recomputes W (nothing saved but the layer)."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, g):
        return g @ ctx.layer.dequantize(g.dtype), None, None


class QuantLinear(nn.Linear):
    """A frozen Linear over CT pack-quantized symmetric codes (``bits`` 4 or 8, ``group_size`` or -1 = channel)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, bits: int = 4,
                 group_size: int = 128, scale_dtype: torch.dtype = torch.bfloat16,
                 dtype: torch.dtype = torch.float32, device=None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: there is no weight Parameter to create
        if bits not in BITS:
            raise ConfigError(f"QuantLinear holds {' or '.join(map(str, BITS))}-bit codes, not {bits}")
        if group_size > 0 and in_features % group_size:
            raise ConfigError(f"{in_features} input columns are not whole groups of {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size if group_size > 0 else -1
        self.scale_dtype, self.compute_dtype = scale_dtype, dtype
        groups = in_features // group_size if group_size > 0 else 1
        words = math.ceil(in_features * bits / 32)
        self.register_buffer("weight_packed", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=scale_dtype, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- codes and weights ------------------------------------------------------------------
    @property
    def groups(self) -> int:
        return self.weight_scale.shape[1]

    def codes(self) -> torch.Tensor:
        """Signed integer codes (out, in), int16: CT's [-2^(b-1), 2^(b-1))."""
        return unpack_codes(self.weight_packed, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight in ``dtype`` (default: the compute dtype); a new tensor each call."""
        q = self.codes().float()
        s = self.weight_scale.float()
        if self.groups == 1:
            w = q * s
        else:
            w = (q.view(self.out_features, self.groups, -1) * s[:, :, None]).view(self.out_features, -1)
        # the readers' value: float32 product rounded to the scales' storage dtype (io/quantized._affine)
        return w.to(self.scale_dtype).to(dtype or self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:  # read-only: writes go through set_weight_2d (re-quantization)
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if torch.is_grad_enabled() and x.requires_grad:
            return _DequantLinear.apply(x, self, bias)
        return F.linear(x, self.dequantize(x.dtype), bias)

    # -- re-quantization ----------------------------------------------------------------------
    keep_scales = False  # set_weight_2d rounds onto the stored scales instead of fitting new ones

    def set_weight_2d(self, w2d: torch.Tensor) -> None:
        """Store a new (out, in) weight: RTN on this layer's grid; unchanged (row, group)s keep their codes.
        ``keep_scales``: every group keeps its scale and a code moves only where the weight moved by more than
        half a step (a fresh RTN would refit every changed group's scale and re-round all of its weights)."""
        from ..tensor.quant import SCALE_DTYPES, rtn

        W = w2d.detach().to(self.weight_packed.device, torch.float32)
        if tuple(W.shape) != (self.out_features, self.in_features):
            raise ConfigError(f"weight of shape {tuple(W.shape)} does not fit a {self.out_features}x"
                              f"{self.in_features} QuantLinear")
        old = self.dequantize(torch.float32)
        if torch.equal(W, old):
            return
        if self.keep_scales:
            top = (1 << (self.bits - 1)) - 1
            s = self.weight_scale.to(torch.float32).unsqueeze(-1)  # (out, G, 1)
            codes = torch.clamp(torch.round(W.view(self.out_features, self.groups, -1) / s), -top - 1, top)
            self.weight_packed = pack_codes(codes.view(self.out_features, -1).to(torch.int16), self.bits)
            return
        sdt = next(k for k, v in SCALE_DTYPES.items() if v == self.scale_dtype)
        q = rtn(W, self.bits, self.group_size, sym=True, scale_dtype=sdt)
        codes = q.codes.to(torch.int16) - (1 << (self.bits - 1))
        scales = q.scales.to(self.scale_dtype)
        G = self.groups
        same = (W.view(self.out_features, G, -1) == old.view(self.out_features, G, -1)).all(-1)  # (out, G)
        codes.view(self.out_features, G, -1)[same] = self.codes().view(self.out_features, G, -1)[same]
        scales[same] = self.weight_scale[same]
        self.weight_packed = pack_codes(codes, self.bits)
        self.weight_scale = scales

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, scales={str(self.scale_dtype)[6:]}")


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """CT int32 words (out, W) -> signed codes (out, in) int16, for 4 or 8 bits (values never straddle
    words, so the words' little-endian bytes hold them in column order, low nibble first)."""
    if sys.byteorder != "little":  # the byte view below assumes little-endian words
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        q = ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(packed.shape[0], -1)
        return q[:, :in_features].to(torch.int16) - (1 << (bits - 1))
    raw = packed.contiguous().view(torch.uint8)
    q = torch.stack([raw & 15, raw >> 4], dim=-1).reshape(raw.shape[0], -1) if bits == 4 else raw
    return q[:, :in_features].to(torch.int16) - (1 << (bits - 1))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes (out, in) -> CT's int32 words, packed by the compressed-tensors library itself."""
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:
        raise MissingDependencyError("compressed-tensors", "re-quantizing a compressed-tensors layer",
                                     "'weightlab[hf]'") from None
    return pack_to_int32(codes.to(torch.int8).cpu(), bits).to(codes.device)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# -- loading a compressed-tensors folder -----------------------------------------------------
def ct_scheme(path: Path, config: dict | None) -> dict:
    """The one weights QuantizationArgs of a CT folder that QuantLinear can hold, or a clear error."""
    from .quantized import detect

    found = detect(path, config)
    if found is None or found[0] != "compressed-tensors":
        what = "a dense folder" if found is None else f"a {found[0]} folder"
        raise ConfigError(f"'{path}' is {what}, not a compressed-tensors checkpoint; a 4-bit base comes from "
                          "'weightlab quantize MODEL -m rtn|gptq -b 4 -o BASE' (a dense base trains with adapters "
                          "directly)")
    q = found[1]
    groups = q.get("config_groups") or {}
    args = [g.get("weights") or {} for g in groups.values()]
    if not args or any(a != args[0] for a in args):
        raise UnsupportedFormatError("compressed-tensors config groups with different weight schemes cannot be "
                                     "held packed; load the base dense (weightlab tune --dequantize-base)", path)
    a, fmts = args[0], {q.get("format"), *(g.get("format") for g in groups.values())} - {None}
    problems = []
    if fmts != {"pack-quantized"}:
        problems.append(f"format {sorted(fmts)} (need pack-quantized)")
    if a.get("type", "int") != "int" or a.get("num_bits") not in BITS:
        problems.append(f"{a.get('type', 'int')}{a.get('num_bits')} weights (need int4 or int8)")
    if not a.get("symmetric", True):
        problems.append("asymmetric weights (zero points; need symmetric)")
    if a.get("strategy") not in ("group", "channel"):
        problems.append(f"strategy {a.get('strategy')!r} (need group or channel)")
    if a.get("actorder") not in (None, "static", False):
        problems.append(f"actorder {a.get('actorder')!r} (permuted groups)")
    if any(g.get("input_activations") for g in groups.values()):
        problems.append("quantized input activations")
    sparse = q.get("sparsity_config")
    if isinstance(sparse, dict) and sparse.get("format") not in (None, "dense"):
        problems.append(f"sparsity format {sparse.get('format')!r}")
    if problems:
        raise UnsupportedFormatError("this compressed-tensors scheme cannot be held packed: " + "; ".join(problems)
                                     + ". Load it dense (weightlab tune --dequantize-base, or "
                                     "weightlab.io.hf.load_causal_lm), or re-quantize with "
                                     "'weightlab quantize -m rtn -b 4 --sym'", path)
    return a


def is_compressed_tensors(path) -> bool:
    """Whether ``path`` is a model folder whose config.json declares compressed-tensors quantization."""
    import json

    from .quantized import detect

    p = Path(path).expanduser()
    if not (p.is_dir() and (p / "config.json").is_file()):
        return False
    try:
        found = detect(p, json.loads((p / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return False
    return found is not None and found[0] == "compressed-tensors"


def load_quantized_causal_lm(path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a CT pack-quantized folder with its quantized Linears as ``QuantLinear``.

    ``dtype`` is the compute dtype (activations, dequantized weights, the other tensors such as
    embeddings and norms). The model's config keeps ``quantization_config``, so ``save_pretrained``
    of a (re-quantized) model writes a CT folder again.
    """
    import accelerate

    from .hf import load_config, load_tokenizer, transformers_module
    from .reader import _read_json, open_checkpoint

    p = Path(path).expanduser()
    if not (p.is_dir() and (p / "config.json").is_file()):
        raise ConfigError(f"'{path}' is not a model folder with a config.json")
    raw_config = _read_json(p / "config.json")
    args = ct_scheme(p, raw_config)
    gs = int(args.get("group_size") or -1) if args.get("strategy") == "group" else -1
    tf = transformers_module()
    config = load_config(p)
    tok = load_tokenizer(p)
    with accelerate.init_empty_weights(include_buffers=False):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    with open_checkpoint(p, decode=False) as ck:
        names = set(ck.names())
        for n, m in list(model.named_modules()):
            if not (f"{n}.weight_packed" in names and isinstance(m, nn.Linear)):
                continue
            for suffix in ("weight_scale", "weight_shape"):
                if f"{n}.{suffix}" not in names:
                    raise CheckpointError(f"packed layer lacks {suffix}", p, f"{n}.weight_packed")
            sdt = ck.info(f"{n}.weight_scale").dtype
            ql = QuantLinear(m.in_features, m.out_features, m.bias is not None, bits=int(args["num_bits"]),
                             group_size=gs, scale_dtype=sdt, dtype=dtype)
            for suffix in ("weight_packed", "weight_scale", "weight_shape"):
                t, want = ck.get(f"{n}.{suffix}"), getattr(ql, suffix)
                if tuple(t.shape) != tuple(want.shape) or t.dtype != want.dtype:
                    raise CheckpointError(f"stored {tuple(t.shape)} {t.dtype}, expected {tuple(want.shape)} "
                                          f"{want.dtype} for a {m.out_features}x{m.in_features} layer",
                                          p, f"{n}.{suffix}")
                setattr(ql, suffix, t.clone())  # out of the memory map: the model owns its bytes
            if ql.weight_shape.tolist() != [m.out_features, m.in_features]:
                raise CheckpointError(f"weight_shape {ql.weight_shape.tolist()} does not match the model's "
                                      f"{m.out_features}x{m.in_features} layer", p, f"{n}.weight_shape")
            _set_module(model, n, ql)
        sd, quant = {}, {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        for key, t in model.state_dict(keep_vars=True).items():
            owner = key.rsplit(".", 1)[0]
            if owner in quant and not key.endswith(".bias"):
                continue
            if key not in names:
                continue  # tied output embedding, or a buffer computed by the model (checked below)
            v = ck.get(key)
            sd[key] = (v.to(dtype) if v.is_floating_point() else v).clone()
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    left = [k for k in missing if k not in tied and not any(k.startswith(q + ".weight_") for q in quant)]
    if left:
        raise CheckpointError(f"tensors missing for this model: {left[:3]}", p)
    if tied:
        model.tie_weights()
    meta = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise CheckpointError(f"tensors missing for this model: {meta[:3]}", p)
    for q in quant:  # the base is frozen: _DequantLinear gives no gradient to a bias
        b = model.get_submodule(q).bias
        if b is not None:
            b.requires_grad_(False)
    config.quantization_config = raw_config.get("quantization_config") or raw_config.get("compression_config")
    config._name_or_path = str(p)
    return model.eval(), tok


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
