"""Atomic, streaming, sharded safetensors writer.

Tensors are written to disk as they are added (memory stays at one tensor, not one
shard); everything goes into a hidden temporary folder beside the target that is renamed
into place only when the whole output is complete. A crash leaves no folder under the
final name. The writer refuses to write into or over its inputs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from ..errors import CheckpointError
from .atomic import AtomicFolder
from .dtypes import TORCH_TO_ST, parse_dtype
from .provenance import Provenance
from .safetensors_format import build_header

# names of stored quantized tensors (GPTQ/AWQ, compressed-tensors, weightlab's packed format)
_PACKED_SUFFIXES = (".qweight", ".qzeros", ".weight_packed", ".weight_scale", ".weight_zero_point", ".scales")
TEMPLATE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "adapter_config.json",
)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(size: int | str) -> int:
    """'5GB' -> 5e9 (decimal, as Hugging Face does), '2GiB' -> 2**31, 1000 -> 1000."""
    if isinstance(size, int):
        return size
    m = _SIZE.match(str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


class CheckpointWriter:
    """Write tensors one by one into an HF-style folder of safetensors shards.

    Use as a context manager; the folder appears under ``out_dir`` only on a clean exit.
    """

    def __init__(self, out_dir: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                 template: str | os.PathLike | None = None, provenance: Provenance | None = None,
                 inputs: list[str | os.PathLike] = (), force: bool = False, dtype: str | torch.dtype | None = None,
                 prefix: str = "model", readme: bool = True):
        self.out = Path(out_dir).expanduser()
        self.max_shard = parse_size(max_shard_size)
        self.template = Path(template).expanduser() if template else None
        self.config_edits: list = []  # functions dict -> dict applied to the template's config.json
        self.provenance = provenance or Provenance()
        self.dtype = parse_dtype(dtype) if dtype is not None else None
        self.prefix = prefix
        self.readme = readme
        self.force = force
        ins = list(inputs) + [self.template] + list(self.provenance.inputs)
        self._folder = AtomicFolder(self.out, force=force, inputs=ins)
        self.tmp = self._folder.tmp
        self._shards: list[tuple[Path, list[str]]] = []  # finished shard files and their tensors
        self._entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
        self._names: set[str] = set()
        self._float_numel: dict = {}  # floating dtype -> elements stored (config.json records the dominant one)
        self._data_path: Path | None = None
        self._data = None
        self._pos = 0
        self.total_size = 0
        self._closed = False
        self.extra_files: dict[str, str | bytes] = {}

    # --- adding -------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise RuntimeError("writer is closed")
        if name in self._names:
            raise CheckpointError("tensor added twice", self.out, name)
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        if t.dtype not in TORCH_TO_ST:
            raise CheckpointError(f"dtype {t.dtype} cannot be stored in safetensors", self.out, name)
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        if self._entries and self._pos + nbytes > self.max_shard:
            self._finish_shard()
        if self._data is None:
            self._data_path = self.tmp / f"shard-{len(self._shards) + 1:05d}.data"
            self._data = open(self._data_path, "wb")
        if nbytes:
            self._data.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._entries.append((name, TORCH_TO_ST[t.dtype], tuple(t.shape), self._pos, self._pos + nbytes))
        if t.is_floating_point():
            self._float_numel[t.dtype] = self._float_numel.get(t.dtype, 0) + t.numel()
        self._pos += nbytes
        self.total_size += nbytes
        self._names.add(name)

    def add_file(self, name: str, content: str | bytes) -> None:
        """Add an extra file (e.g. a report) written into the folder before it is renamed."""
        if "/" in name or name.startswith("."):
            raise ValueError(f"extra file name must be a plain file name, got {name!r}")
        self.extra_files[name] = content

    def _finish_shard(self) -> None:
        if self._data is None:
            self._data_path = self.tmp / f"shard-{len(self._shards) + 1:05d}.data"
            self._data = open(self._data_path, "wb")
        self._data.close()
        path = self.tmp / f"shard-{len(self._shards) + 1:05d}.safetensors"
        meta = {"format": "pt", **self.provenance.metadata()}
        with open(path, "wb") as dst, open(self._data_path, "rb") as src:
            dst.write(build_header(self._entries, meta))
            dst.flush()  # copy_file_range writes at the OS file position
            _copy(src, dst, self._pos)
        self._data_path.unlink()
        self._shards.append((path, [e[0] for e in self._entries]))
        self._entries, self._pos, self._data, self._data_path = [], 0, None, None

    # --- finishing ----------------------------------------------------------------------
    def close(self) -> Path:
        if self._closed:
            return self.out
        if self._entries or not self._shards:
            self._finish_shard()
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(self._shards, 1):
            final = f"{self.prefix}.safetensors" if n == 1 else f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.tmp / final)
            weight_map.update({nm: final for nm in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if self.template is not None and self.template.suffix == ".gguf" and self.template.is_file():
            # a GGUF's folder holds unrelated files; its config and tokenizer live inside the file
            from .hf_export import gguf_side_files

            for fname, content in gguf_side_files(self.template).items():
                (self.tmp / fname).write_bytes(content)
        elif self.template is not None:
            src = self.template if self.template.is_dir() else self.template.parent
            for fname in TEMPLATE_FILES:
                if (src / fname).is_file():
                    shutil.copy2(src / fname, self.tmp / fname)
            self._drop_stale_quantization(self.tmp / "config.json")
            self._edit_config(self.tmp / "config.json")
            self._record_dtype(self.tmp / "config.json")
        if self.readme:
            (self.tmp / "README.md").write_text(self.provenance.readme())
        for fname, content in self.extra_files.items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(self.tmp / fname, mode) as f:
                f.write(content)
        self._folder.publish()
        self._closed = True
        return self.out

    def _edit_config(self, config: Path) -> None:
        """Apply ``config_edits`` (functions dict -> dict), e.g. a frankenmerge's new layer count."""
        if not self.config_edits or not config.is_file():
            return
        data = json.loads(config.read_text(encoding="utf-8"))
        for edit in self.config_edits:
            data = edit(data)
        config.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    def _record_dtype(self, config: Path) -> None:
        """config.json says the dtype the weights are stored in (cast / --dtype changed it; transformers
        loads with ``dtype="auto"`` from it)."""
        if not self._float_numel or not config.is_file() or any(n.endswith(_PACKED_SUFFIXES) for n in self._names):
            return
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if not isinstance(cfg, dict):
            return
        stored = str(max(self._float_numel, key=self._float_numel.get)).removeprefix("torch.")
        # the keys the config has; a config without one gets torch_dtype only when this write chose the dtype
        keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or (["torch_dtype"] if self.dtype is not None else [])
        if not keys:
            return
        if all(cfg.get(k) == stored for k in keys):
            return
        for k in keys:
            cfg[k] = stored
        config.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")

    def _drop_stale_quantization(self, config: Path) -> None:
        """A template from a quantized folder (GPTQ, AWQ, compressed-tensors) whose tensors were read
        dense: keep its config.json but drop the quantization entry, or loaders would look for packed
        tensors that this folder does not hold."""
        if not config.is_file() or any(n.endswith(_PACKED_SUFFIXES) for n in self._names):
            return
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return
        if isinstance(cfg, dict) and ("quantization_config" in cfg or "compression_config" in cfg):
            cfg.pop("quantization_config", None)
            cfg.pop("compression_config", None)
            config.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")

    def abort(self) -> None:
        if self._data is not None:
            self._data.close()
        self._folder.abort()
        self._closed = True

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def _copy(src, dst, nbytes: int) -> None:
    """Copy the spooled data after the header; in-kernel where the OS allows."""
    left = nbytes
    try:
        while left > 0:
            done = os.copy_file_range(src.fileno(), dst.fileno(), left)
            if done == 0:
                break
            left -= done
    except (AttributeError, OSError):
        pass  # both file positions have advanced by what was copied; finish in user space
    if left > 0:
        shutil.copyfileobj(src, dst, 16 * 2**20)


def save_state_dict(state_dict: dict[str, torch.Tensor], out_dir: str | os.PathLike, **kwargs) -> Path:
    # kwargs: CheckpointWriter's options (max_shard_size, template, provenance, inputs, force, dtype, readme)
    """Write a whole state dict through CheckpointWriter (atomic, sharded)."""
    with CheckpointWriter(out_dir, **kwargs) as w:
        for name, t in state_dict.items():
            w.add(name, t)
    return w.out
