"""Read quantized Hugging Face folders as dense tensors: compressed-tensors, GPTQ, AWQ (GEMM).

``QuantizedView`` sits on top of the stored tensors and presents each quantized Linear as one
dense ``<module>.weight`` (dtype of its scales), computed when asked for, one module at a time.
Everything else passes through. Layouts are in docs/design.md ("Reading deployment formats").
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import CorruptCheckpointError, UnsupportedFormatError

# compressed-tensors activation/KV parameters: they only matter to fake-quant runtimes; a dense
# model has no place for them
_CT_RUNTIME = ("input_scale", "input_zero_point", "output_scale", "output_zero_point", "k_scale", "v_scale",
               "input_global_scale", "weight_global_scale")


# ---- bit unpacking -----------------------------------------------------------------------------
def unpack_rows(words: torch.Tensor, bits: int, count: int, *, dense: bool = True) -> torch.Tensor:
    """Unsigned codes [rows, count] from int32 words [rows, W], least significant bits first.

    dense=True: one bit stream per row, values may straddle words (compressed-tensors >= 0.18,
    GPTQ 3-bit). dense=False: floor(32/bits) values per word, high bits unused (CT <= 0.17).
    For bits in 1, 2, 4, 8 both are the same.
    """
    if words.dtype != torch.int32 or words.ndim != 2:
        raise ValueError(f"expected 2-D int32 words, got {words.dtype} {tuple(words.shape)}")
    rows, n_words = words.shape
    if 32 % bits == 0:
        per = 32 // bits
        shifts = torch.arange(per, dtype=torch.int64) * bits
        vals = (words.to(torch.int64)[..., None] & 0xFFFFFFFF) >> shifts & ((1 << bits) - 1)
        out = vals.reshape(rows, n_words * per)
    else:
        raw = np.ascontiguousarray(words.numpy()).view(np.uint8).reshape(rows, n_words * 4)
        stream = np.unpackbits(raw, axis=-1, bitorder="little")  # word 0 bit 0, bit 1, ... (little-endian)
        if dense:
            need = count * bits
            if need > stream.shape[1]:
                raise ValueError(f"{n_words} words hold {stream.shape[1] // bits} {bits}-bit values, need {count}")
            chunks = stream[:, :need].reshape(rows, count, bits)
        else:
            per = 32 // bits
            chunks = stream.reshape(rows, n_words, 32)[:, :, :per * bits].reshape(rows, n_words * per, bits)
        weights = (1 << np.arange(bits, dtype=np.int64))
        out = torch.from_numpy(chunks.astype(np.int64) @ weights)
    if out.shape[1] < count:
        raise ValueError(f"{n_words} words hold {out.shape[1]} {bits}-bit values, need {count}")
    return out[:, :count]


def _ct_words_needed(n: int, bits: int, dense: bool) -> int:
    return math.ceil(n * bits / 32) if dense else math.ceil(n / (32 // bits))


def _ct_unpack(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """CT codes, telling the dense (>= 0.18) and word-aligned (<= 0.17) packings apart by width.

    Nothing in the checkpoint records which one wrote it; for 3/5/6/7 bits the word counts differ
    for almost every width, and where they coincide we take the current (dense) packing.
    """
    width = words.shape[1]
    if width == _ct_words_needed(count, bits, True):
        return unpack_rows(words, bits, count, dense=True)
    if width == _ct_words_needed(count, bits, False):
        return unpack_rows(words, bits, count, dense=False)
    raise ValueError(f"packed width {width} fits neither packing of {count} {bits}-bit values")


# ---- view -------------------------------------------------------------------------------------
class QuantizedView:
    """Backend for Checkpoint: dense names in, decoding on demand. ``path`` is None (no file of its own)."""

    path = None

    def __init__(self, raw, fmt: str, qcfg: dict):
        self.raw = raw  # a Checkpoint over the stored tensors
        self.format = fmt
        self.qcfg = qcfg
        self._raw_infos = {i.name: i for i in raw.infos()}
        self._decoders: dict[str, tuple] = {}  # dense name -> (function, prefix, consumed raw names)
        self._pass: set[str] = set()
        self._bits: dict[str, int] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}  # prefix -> dense shape, dtype
        {"compressed-tensors": self._plan_ct, "gptq": self._plan_gptq, "awq": self._plan_awq}[fmt]()
        consumed = {n for _, _, used in self._decoders.values() for n in used}
        self._pass = {n for n in self._raw_infos if n not in consumed and not n.endswith(_CT_RUNTIME)}

    # ---- backend API ----
    def infos(self):
        from .reader import TensorInfo

        out = {}
        for n in self._raw_infos:  # keep the stored order; a module's dense weight takes its first slot
            if n in self._pass:
                out[n] = self._raw_infos[n]
        for dense, (fn, prefix, used) in self._decoders.items():
            shape, dtype = self._dense_meta(dense, prefix)
            out[dense] = TensorInfo(dense, shape, dtype, self._raw_infos[used[0]].file)
        return out

    def get(self, name: str) -> torch.Tensor:
        if name in self._decoders:
            fn, prefix, _ = self._decoders[name]
            try:
                return fn(prefix)
            except (ValueError, RuntimeError, IndexError) as e:
                raise CorruptCheckpointError(f"cannot decode {self.format} tensors: {e}", self.raw.path, name) from None
        return self.raw.get(name)

    def release(self, name: str) -> None:
        used = self._decoders[name][2] if name in self._decoders else [name]
        for n in used:
            self.raw.release(n)

    def summary(self) -> dict:
        qbits = sum(self._raw_infos[n].nbytes * 8 for _, _, used in self._decoders.values() for n in used)
        qel = sum(math.prod(self._dense_meta(d, p)[0]) for d, (_, p, _) in self._decoders.items())
        out = {"format": self.format, "quantized_layers": len(self._decoders),
               "bits_per_weight": round(qbits / qel, 4) if qel else None}
        bits = sorted(set(self._bits.values()))
        if bits:
            out["bits"] = bits[0] if len(bits) == 1 else bits
        for k in ("group_size", "desc_act", "sym", "version", "checkpoint_format", "zero_point"):
            if k in self.qcfg:
                out[k] = self.qcfg[k]
        if self.format == "compressed-tensors":
            out["ct_format"] = self.qcfg.get("format")
        return out

    # ---- helpers ----
    def _t(self, name: str) -> torch.Tensor:
        return self.raw.get(name)

    def _dense_meta(self, dense: str, prefix: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self._meta[prefix]

    def _add(self, prefix: str, fn, used: list[str], shape: tuple[int, ...], dtype: torch.dtype,
             bits: int | None = None) -> None:
        self._decoders[f"{prefix}.weight"] = (fn, prefix, used)
        self._meta[prefix] = (shape, dtype)
        if bits:
            self._bits[prefix] = bits

    def _prefixes(self, suffix: str) -> list[str]:
        return [n[: -len(suffix) - 1] for n in self._raw_infos if n.endswith("." + suffix)]

    # ---- compressed-tensors ----
    def _plan_ct(self) -> None:
        q, infos = self.qcfg, self._raw_infos
        fmt = q.get("format")
        if fmt == "marlin-24":
            raise UnsupportedFormatError("compressed-tensors 'marlin-24' (Marlin-tile-permuted 2:4) has no "
                                         "decompressor anywhere; it cannot be read", self.raw.path)
        sparse = (q.get("sparsity_config") or {}).get("format") if isinstance(q.get("sparsity_config"), dict) else None
        if fmt in ("sparse-bitmask", "sparse-24-bitmask"):
            sparse = fmt
        # stage 1 (legacy sparsity): bitmask-compressed weights -> the stored (possibly still quantized) weight
        self._sparse: dict[str, str] = {}
        if sparse in ("sparse-bitmask", "sparse-24-bitmask"):
            for p in self._prefixes("bitmask"):
                self._sparse[f"{p}.weight"] = p
        elif sparse not in (None, "dense"):
            raise UnsupportedFormatError(f"compressed-tensors sparsity format '{sparse}' is not supported",
                                         self.raw.path)
        for p in self._prefixes("weight_packed"):
            s = infos.get(f"{p}.weight_scale")
            shape_t = f"{p}.weight_shape"
            if s is None or shape_t not in infos:
                raise CorruptCheckpointError("pack-quantized layer lacks weight_scale or weight_shape",
                                             self.raw.path, p)
            out, inn = (int(x) for x in self._t(shape_t).reshape(-1).tolist())
            bits = int(self._weight_args(p).get("num_bits") or 0)
            if not bits:
                raise CorruptCheckpointError("cannot tell num_bits of this pack-quantized layer from config_groups",
                                             self.raw.path, p)
            used = [n for n in (f"{p}.weight_packed", f"{p}.weight_scale", shape_t, f"{p}.weight_zero_point",
                                f"{p}.weight_g_idx") if n in infos]
            self._add(p, self._ct_packed, used, (out, inn), s.dtype, bits)
        for p in self._prefixes("weight_scale"):
            if f"{p}.weight_packed" in infos:
                continue
            wname = f"{p}.weight"
            if wname not in infos and wname not in self._sparse:
                continue
            used = [n for n in (f"{p}.weight_scale", f"{p}.weight_zero_point", f"{p}.weight_g_idx") if n in infos]
            used += self._sparse_names(p) if wname in self._sparse else [wname]
            shape = self._sparse_shape(p) if wname in self._sparse else infos[wname].shape
            stored = self._sparse_dtype(p) if wname in self._sparse else infos[wname].dtype
            if stored in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                continue  # 'dense'/frozen fake-quant: the weight is already real-valued, its scale is metadata
            bits = torch.finfo(stored).bits if stored.is_floating_point else torch.iinfo(stored).bits
            self._add(p, self._ct_scaled, used, tuple(shape), infos[f"{p}.weight_scale"].dtype, bits)
        for wname, p in self._sparse.items():
            if f"{p}.weight" in self._decoders:
                continue  # sparse and quantized: handled by _ct_scaled above
            self._add(p, self._sparse_weight, self._sparse_names(p), tuple(self._sparse_shape(p)),
                      self._sparse_dtype(p))

    def _weight_args(self, prefix: str) -> dict:
        """The weights QuantizationArgs of the config group whose targets match this module."""
        groups = self.qcfg.get("config_groups") or {}
        args = [g.get("weights") or {} for g in groups.values()]
        if len({json.dumps(a, sort_keys=True) for a in args}) == 1:
            return args[0]
        for g in groups.values():
            for t in g.get("targets") or []:
                if t == "Linear" or t == prefix or (t.startswith("re:") and re.match(t[3:], prefix)):
                    return g.get("weights") or {}
        return {}

    def _ct_packed(self, p: str) -> torch.Tensor:
        out, inn = self._meta[p][0]
        bits = self._bits[p]
        args = self._weight_args(p)
        q = _ct_unpack(self._t(f"{p}.weight_packed"), bits, inn) - (1 << (bits - 1))
        scale = self._t(f"{p}.weight_scale")
        z = None
        zname = f"{p}.weight_zero_point"
        if zname in self._raw_infos:
            zp = self._t(zname)
            if zp.dtype == torch.int32 and zp.ndim == 2:  # packed along dim 0 (out)
                z = _ct_unpack(zp.t().contiguous(), bits, out).t() - (1 << (bits - 1))
            else:
                z = zp.to(torch.int64)
        g_idx = self._t(f"{p}.weight_g_idx").to(torch.int64) if f"{p}.weight_g_idx" in self._raw_infos else None
        return _affine(q, scale, z, g_idx, args).to(scale.dtype)

    def _ct_scaled(self, p: str) -> torch.Tensor:
        w = self._sparse_weight(p) if f"{p}.weight" in self._sparse else self._t(f"{p}.weight")
        scale = self._t(f"{p}.weight_scale")
        z = self._t(f"{p}.weight_zero_point") if f"{p}.weight_zero_point" in self._raw_infos else None
        g_idx = self._t(f"{p}.weight_g_idx").to(torch.int64) if f"{p}.weight_g_idx" in self._raw_infos else None
        return _affine(w, scale, z, g_idx, self._weight_args(p)).to(scale.dtype)

    def _sparse_names(self, p: str) -> list[str]:
        names = (f"{p}.compressed", f"{p}.bitmask", f"{p}.shape", f"{p}.row_offsets")
        return [n for n in names if n in self._raw_infos]

    def _sparse_shape(self, p: str) -> tuple[int, int]:
        out, inn = (int(x) for x in self._t(f"{p}.shape").reshape(-1).tolist())
        return out, inn

    def _sparse_dtype(self, p: str) -> torch.dtype:
        return self._raw_infos[f"{p}.compressed"].dtype

    def _sparse_weight(self, p: str) -> torch.Tensor:
        out, inn = self._sparse_shape(p)
        bm = self._t(f"{p}.bitmask").numpy()
        mask = np.unpackbits(bm, axis=-1, bitorder="little")[:, :inn].astype(bool)
        vals = self._t(f"{p}.compressed").reshape(-1)
        if int(mask.sum()) != vals.numel():
            raise ValueError(f"bitmask has {int(mask.sum())} set bits but {vals.numel()} values are stored")
        dense = torch.zeros((out, inn), dtype=vals.dtype)
        # values are stored in row-major order of the kept positions, for both bitmask layouts
        dense[torch.from_numpy(mask)] = vals
        return dense

    # ---- GPTQ ----
    def _plan_gptq(self) -> None:
        q = self.qcfg
        fmt = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise UnsupportedFormatError(f"GPTQ checkpoint_format '{fmt}' is not read (only gptq and gptq_v2)",
                                         self.raw.path)
        self._gptq_v2 = fmt == "gptq_v2"
        bits = int(q.get("bits", 4))
        if bits not in (2, 3, 4, 8):
            raise UnsupportedFormatError(f"GPTQ with {bits} bits is not read (2, 3, 4, 8)", self.raw.path)
        for p in self._prefixes("qweight"):
            need = [f"{p}.qweight", f"{p}.qzeros", f"{p}.scales"]
            if any(n not in self._raw_infos for n in need):
                raise CorruptCheckpointError("GPTQ layer lacks qzeros or scales", self.raw.path, p)
            out = self._raw_infos[f"{p}.scales"].shape[1]
            inn = self._raw_infos[f"{p}.qweight"].shape[0] * 32 // bits
            used = need + ([f"{p}.g_idx"] if f"{p}.g_idx" in self._raw_infos else [])
            self._add(p, self._gptq, used, (out, inn), self._raw_infos[f"{p}.scales"].dtype, bits)

    def _gptq(self, p: str) -> torch.Tensor:
        out, inn = self._meta[p][0]
        bits = self._bits[p]
        qw = self._t(f"{p}.qweight")  # [in*b/32, out], packed along in
        q = unpack_rows(qw.t().contiguous(), bits, inn)  # [out, in]
        scales = self._t(f"{p}.scales")  # [groups, out]
        z = unpack_rows(self._t(f"{p}.qzeros"), bits, out)  # [groups, out]
        if not self._gptq_v2:
            z = z + 1  # v1 stores zero - 1 (AutoGPTQ); no wrap-around, exactly as its dequantizer
        if f"{p}.g_idx" in self._raw_infos:
            g = self._t(f"{p}.g_idx").to(torch.int64)
        else:
            gs = int(self.qcfg.get("group_size", -1))
            g = torch.arange(inn) // (gs if gs > 0 else inn)
        if g.numel() != inn or int(g.max()) >= scales.shape[0] or int(g.min()) < 0:
            raise ValueError(f"g_idx does not fit {scales.shape[0]} groups of {inn} columns")
        s = scales.t().float()[:, g]  # [out, in]
        return (s * (q - z.t()[:, g]).float()).to(scales.dtype)

    # ---- AWQ ----
    _AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a word holds column 8j + _AWQ_ORDER[k]

    def _plan_awq(self) -> None:
        q = self.qcfg
        version = str(q.get("version") or q.get("format") or "gemm").lower()
        if version != "gemm":
            raise UnsupportedFormatError(f"AWQ '{version}' layout is not read (only gemm)", self.raw.path)
        bits = int(q.get("bits", q.get("w_bit", 4)))
        if bits != 4:
            raise UnsupportedFormatError(f"AWQ with {bits} bits is not read (4 only)", self.raw.path)
        for p in self._prefixes("qweight"):
            need = [f"{p}.qweight", f"{p}.qzeros", f"{p}.scales"]
            if any(n not in self._raw_infos for n in need):
                raise CorruptCheckpointError("AWQ layer lacks qzeros or scales (zero_point=False is not read)",
                                             self.raw.path, p)
            inn, out = self._raw_infos[f"{p}.qweight"].shape[0], self._raw_infos[f"{p}.scales"].shape[1]
            self._add(p, self._awq, need, (out, inn), self._raw_infos[f"{p}.scales"].dtype, bits)

    @classmethod
    def awq_unpack(cls, words: torch.Tensor) -> torch.Tensor:
        """[rows, cols/8] int32 -> [rows, cols] codes in column order."""
        v = unpack_rows(words, 4, words.shape[1] * 8).reshape(words.shape[0], words.shape[1], 8)
        out = torch.empty_like(v)
        out[:, :, list(cls._AWQ_ORDER)] = v
        return out.reshape(words.shape[0], -1)

    def _awq(self, p: str) -> torch.Tensor:
        out, inn = self._meta[p][0]
        q = self.awq_unpack(self._t(f"{p}.qweight"))  # [in, out]
        z = self.awq_unpack(self._t(f"{p}.qzeros"))  # [groups, out]
        scales = self._t(f"{p}.scales")  # [groups, out]
        gs = inn // scales.shape[0]
        g = torch.arange(inn) // gs
        w = (q - z[g]).float() * scales.float()[g]  # [in, out]
        return w.t().contiguous().to(scales.dtype)


def _affine(q: torch.Tensor, scale: torch.Tensor, z: torch.Tensor | None, g_idx: torch.Tensor | None,
            args: dict) -> torch.Tensor:
    """(q - z) * s with s, z broadcast to q's [out, in] by their shape: tensor, channel, group or block."""
    out, inn = q.shape
    qf = q.float()

    def expand(t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        if t.numel() == 1:
            return t.reshape(1, 1)
        if t.ndim == 1:
            t = t.reshape(-1, 1)
        if t.shape == (out, 1) or t.shape == (out, inn):
            return t
        if t.shape[0] == out:  # group: [out, in/G], or g_idx for activation-ordered groups
            if g_idx is not None:
                return t[:, g_idx]
            if inn % t.shape[1]:
                raise ValueError(f"{inn} columns are not {t.shape[1]} equal groups")
            return t.repeat_interleave(inn // t.shape[1], dim=1)
        block = args.get("block_structure") or [math.ceil(out / t.shape[0]), math.ceil(inn / t.shape[1])]
        br, bc = int(block[0]), int(block[1])
        return t.repeat_interleave(br, 0)[:out].repeat_interleave(bc, 1)[:, :inn]

    s = expand(scale)
    if z is not None:
        qf = qf - expand(z)
    return qf * s


def detect(folder: Path, config: dict | None) -> tuple[str, dict] | None:
    """(format, quantization config) of a quantized HF folder, or None for a dense one."""
    cfg = config or {}
    q = cfg.get("quantization_config") or cfg.get("compression_config")
    if not isinstance(q, dict):
        q = None
    for side in ("quantize_config.json", "quant_config.json"):  # AutoGPTQ / AutoAWQ side files
        if q is None and (folder / side).is_file():
            try:
                q = json.loads((folder / side).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise CorruptCheckpointError(f"cannot parse JSON: {e}", folder / side) from None
            q.setdefault("quant_method", "gptq" if side == "quantize_config.json" else "awq")
    if q is None:
        return None
    method = str(q.get("quant_method", "")).lower()
    if method == "compressed-tensors" or ("config_groups" in q or "sparsity_config" in q) and not method:
        return "compressed-tensors", q
    if method in ("gptq", "awq"):
        return method, q
    return None  # bitsandbytes, fp8, ... : read as stored
