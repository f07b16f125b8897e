"""GGUF (llama.cpp) names, the Q/K row permutation, and a lazy dequantizing reader.

Shared by the reader (GGUF -> dense HF tensors) and the exporter (HF -> GGUF) so both use the
same name table and the same permutation. Needs the optional ``gguf`` package.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CorruptCheckpointError, MissingDependencyError, UnsupportedFormatError

# Hugging Face names of a decoder-only transformer block, in the spelling llama/mistral/qwen2
# checkpoints use. gguf's TensorNameMap knows many aliases per GGUF name; going back we want
# exactly this spelling, so we map these names forward and invert that.
_GLOBAL_HF = ("model.embed_tokens", "model.norm", "lm_head")
_BLOCK_HF = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Architectures whose converter (convert_hf_to_gguf.py) permutes q/k rows for llama.cpp's rope.
PERMUTED_ARCHS = ("llama",)
# HF model_type / architectures -> GGUF architecture this module handles.
HF_TO_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
GGUF_TO_HF_CLASS = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM")}


def require_gguf(purpose: str):
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError("gguf", purpose, "'weightlab[hf]'") from None
    return gguf


def _arch_enum(gguf, arch: str):
    for key, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return key
    raise UnsupportedFormatError(f"unknown GGUF architecture '{arch}'")


def hf_to_gguf_names(arch: str, n_blocks: int) -> dict[str, str]:
    """{hf tensor name: gguf tensor name} for weights and biases of a decoder-only model."""
    gguf = require_gguf("GGUF tensor names")
    tmap = gguf.get_tensor_name_map(_arch_enum(gguf, arch), n_blocks)
    hf = list(_GLOBAL_HF) + [f"model.layers.{i}.{s}" for i in range(n_blocks) for s in _BLOCK_HF]
    out: dict[str, str] = {}
    for base in hf:
        for suffix in (".weight", ".bias"):
            g = tmap.get_name(base + suffix, try_suffixes=(".weight", ".bias"))
            if g is not None:
                out[base + suffix] = g
    return out


def permute_qk(w: np.ndarray | torch.Tensor, n_head: int, n_head_kv: int | None = None):
    """llama.cpp's row order for q/k: within each head, interleaved halves -> (re, im) pairs.

    Mirrors ``LlamaModel.permute`` in convert_hf_to_gguf.py; works on rows, so it applies to
    weights [out, in] and to biases [out] alike.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = tuple(w.shape)
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_qk(w: np.ndarray | torch.Tensor, n_head: int, n_head_kv: int | None = None):
    """Inverse of permute_qk (what transformers does when it loads a llama GGUF)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = tuple(w.shape)
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:  # noqa: BLE001 - a malformed optional value reads as absent
        return default


class GGUFFile:
    """Backend for Checkpoint: GGUF tensors under their Hugging Face names, dequantized one at a time.

    Quantized tensors come back as float32, F16/BF16/F32 tensors in their own dtype; q/k rows of
    llama-family files are put back into HF order.
    """

    def __init__(self, path: Path):
        gguf = require_gguf("reading a GGUF file")
        self.path = path
        self._gguf = gguf
        try:
            self.reader = gguf.GGUFReader(str(path), "r")
        except Exception as e:  # noqa: BLE001 - gguf-py fails on damaged headers with many exception types
            raise CorruptCheckpointError(f"cannot read GGUF file (truncated or corrupt?): {e}", path) from None
        r = self.reader
        self.arch = str(_field(r, "general.architecture", ""))
        if not self.arch:
            raise CorruptCheckpointError("GGUF file has no general.architecture", path)
        a = self.arch
        self.n_blocks = int(_field(r, f"{a}.block_count", 0) or 0)
        self.n_head = _field(r, f"{a}.attention.head_count")
        self.n_head_kv = _field(r, f"{a}.attention.head_count_kv", self.n_head)
        try:
            to_gguf = hf_to_gguf_names(a, self.n_blocks)
        except UnsupportedFormatError:
            to_gguf = {}
        back = {g: h for h, g in to_gguf.items()}
        self._tensors = {}
        self._hf_of: dict[str, str] = {}
        for t in r.tensors:
            hf = back.get(t.name, t.name)  # unknown names keep their GGUF spelling: nothing is dropped
            self._tensors[hf] = t
            self._hf_of[t.name] = hf
        self.config = self._hf_config()

    # ---- metadata ------------------------------------------------------------------------
    def _hf_config(self) -> dict:
        """A config.json-like dict from the GGUF metadata (what transformers derives too)."""
        r, a = self.reader, self.arch
        model_type, cls = GGUF_TO_HF_CLASS.get(a, (a, None))
        cfg: dict = {"model_type": model_type}
        if cls:
            cfg["architectures"] = [cls]
        keys = {"block_count": "num_hidden_layers", "embedding_length": "hidden_size",
                "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
                "attention.head_count_kv": "num_key_value_heads", "context_length": "max_position_embeddings",
                "attention.layer_norm_rms_epsilon": "rms_norm_eps", "rope.freq_base": "rope_theta",
                "vocab_size": "vocab_size"}
        for k, hk in keys.items():
            v = _field(r, f"{a}.{k}")
            if v is not None:
                cfg[hk] = v
        if "vocab_size" not in cfg:
            toks = r.fields.get("tokenizer.ggml.tokens")
            if toks is not None:
                cfg["vocab_size"] = len(toks.data)
        for k, hk in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id")):
            v = _field(r, f"tokenizer.ggml.{k}")
            if v is not None:
                cfg[hk] = int(v)
        # llama.cpp reuses token_embd when there is no output tensor; transformers reads that as tied
        cfg["tie_word_embeddings"] = "output.weight" not in self._hf_of
        return cfg

    def quantization(self) -> dict:
        """Source format, the GGUF types used and bits per weight of the 2-D tensors on disk."""
        types: dict[str, int] = {}
        nbits = nel = 0
        for t in self.reader.tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
            if len(t.shape) >= 2:
                nbits += int(t.n_bytes) * 8
                nel += int(t.n_elements)
        ft = _field(self.reader, "general.file_type")
        name = None
        if ft is not None:
            try:
                name = self._gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_")
            except ValueError:
                name = str(ft)
        return {"format": "gguf", "file_type": name, "types": types,
                "bits_per_weight": round(nbits / nel, 4) if nel else None}

    # ---- backend API -----------------------------------------------------------------------
    def infos(self):
        from .reader import TensorInfo

        out = {}
        for hf, t in self._tensors.items():
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            out[hf] = TensorInfo(hf, shape, self._dtype(t), self.path.name)
        return out

    def _dtype(self, t) -> torch.dtype:
        T = self._gguf.GGMLQuantizationType
        return {T.F16: torch.float16, T.BF16: torch.bfloat16, T.F64: torch.float64}.get(t.tensor_type, torch.float32)

    def get(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        T = self._gguf.GGMLQuantizationType
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        try:
            if t.tensor_type in (T.F32, T.F16, T.F64):
                arr = np.array(t.data).reshape(shape)
                out = torch.from_numpy(arr)
            elif t.tensor_type == T.BF16:
                raw = np.array(t.data).view(np.uint16).reshape(shape).astype(np.int32) << 16
                out = torch.from_numpy(raw.view(np.float32)).to(torch.bfloat16)
            else:
                arr = self._gguf.quants.dequantize(t.data, t.tensor_type)
                out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(shape))
        except (NotImplementedError, ValueError) as e:
            raise UnsupportedFormatError(f"cannot dequantize GGUF type {t.tensor_type.name}: {e}", self.path,
                                         name) from None
        if self.arch in PERMUTED_ARCHS and self.n_head:
            if t.name.endswith("attn_q.weight") or t.name.endswith("attn_q.bias"):
                out = unpermute_qk(out, int(self.n_head), int(self.n_head))
            elif t.name.endswith("attn_k.weight") or t.name.endswith("attn_k.bias"):
                out = unpermute_qk(out, int(self.n_head), int(self.n_head_kv))
            out = out.contiguous()
        return out
