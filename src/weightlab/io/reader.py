"""Lazy checkpoint reader: names, shapes and dtypes without reading data; one tensor at a time.

Formats: a Hugging Face model folder (single or sharded safetensors, or pytorch_model.bin
with or without index), a single .safetensors file, a .bin/.pt/.pth state dict (loaded only
with ``weights_only=True``), a PEFT adapter folder, and a .gguf file.

Quantized checkpoints (compressed-tensors, GPTQ, AWQ folders; GGUF files) are decompressed
tensor by tensor into the dense Hugging Face names, so everything downstream sees an ordinary
model; ``Checkpoint.quantization`` says what the source was.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch

from ..errors import CheckpointError, CorruptCheckpointError, MissingShardError, UnsupportedFormatError
from .tensor_files import TORCH_SUFFIXES, TensorInfo, _SafetensorsFile, _TorchFile  # noqa: F401  (TensorInfo re-exported)

class Checkpoint:
    """Lazy view over a checkpoint. Use ``open_checkpoint(path)`` to make one."""

    def __init__(self, path: Path, fmt: str, files: list, where: dict[str, object],
                 config: dict | None = None, metadata: dict[str, str] | None = None,
                 config_name: str | None = None, quantization: dict | None = None):
        self.path = path
        self.format = fmt
        self._files = files
        self._where = where  # tensor name -> backend
        self._infos: dict[str, TensorInfo] = {}
        for backend in files:
            for n, info in backend.infos().items():
                if where.get(n) is backend:
                    self._infos[n] = info
        self.config = config
        self.config_name = config_name
        self.metadata = metadata or {}
        # None for plain checkpoints; else {"format": "gptq"|"awq"|"compressed-tensors"|"gguf",
        # "bits_per_weight": float on disk for the quantized layers, ...}
        self.quantization = quantization
        # quantized folders: a Checkpoint over the tensors as stored (packed codes, scales, ...)
        self.raw: Checkpoint | None = None

    # mapping-like API
    def names(self) -> list[str]:
        return list(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos or (self.raw is not None and name in self.raw)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(name)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            if self.raw is not None and name in self.raw:  # a stored (packed) name of a quantized folder
                return self.raw.info(name)
            raise CheckpointError("no such tensor in the checkpoint", self.path, name) from None

    def infos(self) -> list[TensorInfo]:
        return list(self._infos.values())

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor. Memory-mapped for safetensors; ``dtype`` converts (a copy).

        On a quantized folder a stored (packed) name that the dense view hides is still readable
        here (and through ``info`` and ``in``), so code that checks packed codes directly keeps
        working; ``names()``/``infos()`` list only the dense view.
        """
        if name not in self._infos and self.raw is not None and name in self.raw:
            return self.raw.get(name, dtype)
        info = self.info(name)
        t = self._where[name].get(name)  # type: ignore[attr-defined]
        if tuple(t.shape) != info.shape:
            raise CorruptCheckpointError(f"tensor has shape {tuple(t.shape)}, header says {info.shape}", self.path, name)
        return t.to(dtype) if dtype is not None and t.dtype != dtype else t

    def release(self, name: str) -> None:
        """Hint that ``name``'s data will not be read again soon (frees resident pages of mmapped files)."""
        backend = self._where.get(name)
        if hasattr(backend, "release"):
            backend.release(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for n in self._infos:
            yield n, self.get(n)

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {n: self.get(n, dtype) for n in self._infos}

    @property
    def files(self) -> list[Path]:
        # decoding views (quantized formats) sit on top of the real files and have no file of their own
        return [b.path for b in self._files if getattr(b, "path", None) is not None]

    @property
    def num_parameters(self) -> int:
        return sum(i.numel for i in self._infos.values())

    @property
    def architecture(self) -> str | None:
        if self.config and isinstance(self.config.get("architectures"), list) and self.config["architectures"]:
            return str(self.config["architectures"][0])
        return None

    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        # mmaps are released when the last tensor that views them is collected
        for b in self._files:
            if isinstance(b, _SafetensorsFile):
                b._mm = None

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, format={self.format!r}, tensors={len(self)})"


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        # ValueError: integers of over 4,300 digits; RecursionError: absurd nesting
        raise CorruptCheckpointError(f"cannot parse JSON: {str(e)[:200] or type(e).__name__}", path) from None
    if not isinstance(obj, dict):
        raise CorruptCheckpointError("expected a JSON object", path)
    return obj


def _open_file(path: Path):
    if not path.is_file():  # never open a FIFO or device: reading it could block forever
        raise UnsupportedFormatError("not a regular file (a pipe, socket or device?)", path)
    if path.suffix == ".safetensors":
        return _SafetensorsFile(path)
    if path.suffix in TORCH_SUFFIXES:
        return _TorchFile(path)
    if path.suffix == ".gguf":
        from .gguf_format import GGUFFile

        return GGUFFile(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK":
        return _TorchFile(path)
    raise UnsupportedFormatError(
        "unsupported checkpoint file; expected .safetensors, .bin, .pt or .pth "
        "(or a Hugging Face / PEFT folder)", path)


def _sharded(folder: Path, index_path: Path) -> tuple[list, dict[str, object], dict[str, str]]:
    index = _read_json(index_path)
    wmap = index.get("weight_map")
    if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
        raise CorruptCheckpointError("index has no valid 'weight_map' (tensor name -> shard file)", index_path)
    root = folder.resolve()
    backends: dict[str, object] = {}
    for shard in sorted(set(wmap.values())):
        p = (folder / shard).resolve()
        if Path(shard).is_absolute() or root not in p.parents:
            raise MissingShardError(f"index points to shard '{shard}' outside the checkpoint folder; refusing to read it",
                                    index_path)
        if not p.is_file():
            raise MissingShardError(f"index points to shard '{shard}', which does not exist "
                                    "(incomplete download?)", index_path)
        backends[shard] = _open_file(p)
    where: dict[str, object] = {}
    for name, shard in wmap.items():
        b = backends[shard]
        if name not in b.infos():  # type: ignore[attr-defined]
            raise CorruptCheckpointError(f"index says tensor is in '{shard}' but that shard does not hold it",
                                         index_path, name)
        where[name] = b
    meta = {k: str(v) for k, v in (index.get("metadata") or {}).items()} if isinstance(index.get("metadata"), dict) else {}
    return list(backends.values()), where, meta


def open_checkpoint(path: str | os.PathLike, *, decode: bool = True) -> Checkpoint:
    """Open a checkpoint lazily. Raises CheckpointError subclasses naming the file.

    Quantized folders (compressed-tensors, GPTQ, AWQ) read as dense tensors unless ``decode=False``;
    then the tensors are listed as stored.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError("no such file or folder", p)
    if not (p.is_file() or p.is_dir()):  # a FIFO or device would block the reader forever
        raise UnsupportedFormatError("not a regular file or folder (a pipe, socket or device?)", p)
    if p.is_file():
        b = _open_file(p)
        if p.suffix == ".gguf":
            return Checkpoint(p, "gguf", [b], {n: b for n in b.infos()}, config=b.config,
                              quantization=b.quantization())
        fmt = "safetensors" if isinstance(b, _SafetensorsFile) else "torch"
        meta = dict(b.header.metadata) if isinstance(b, _SafetensorsFile) else {}
        return Checkpoint(p, fmt, [b], {n: b for n in b.infos()}, metadata=meta)

    config_path = p / "config.json"
    adapter_cfg = p / "adapter_config.json"
    candidates = [
        ("peft-adapter", None, "adapter_model.safetensors"),
        ("peft-adapter", None, "adapter_model.bin"),
        ("hf-sharded", "model.safetensors.index.json", None),
        ("hf", None, "model.safetensors"),
        ("hf-sharded", "pytorch_model.bin.index.json", None),
        ("hf", None, "pytorch_model.bin"),
    ]
    for fmt, index_name, file_name in candidates:
        if fmt == "peft-adapter" and not adapter_cfg.is_file():
            continue
        if index_name and (p / index_name).is_file():
            files, where, meta = _sharded(p, p / index_name)
            first = files[0] if files else None
            if isinstance(first, _SafetensorsFile):
                meta = {**first.header.metadata, **meta}
            break
        if file_name and (p / file_name).is_file():
            b = _open_file(p / file_name)
            files, where = [b], {n: b for n in b.infos()}
            meta = dict(b.header.metadata) if isinstance(b, _SafetensorsFile) else {}
            break
    else:
        st = sorted(f for f in p.glob("*.safetensors") if f.is_file())
        if len(st) == 1:
            fmt = "safetensors-folder"
            b = _open_file(st[0])
            files, where, meta = [b], {n: b for n in b.infos()}, dict(b.header.metadata)
        else:
            found = ", ".join(sorted(x.name for x in p.iterdir())[:10]) or "nothing"
            raise UnsupportedFormatError(
                "folder is not a Hugging Face model or PEFT adapter folder: expected model.safetensors, "
                f"model.safetensors.index.json, pytorch_model.bin or adapter_model.safetensors; found {found}", p)

    config, config_name = None, None
    if fmt == "peft-adapter":
        config, config_name = _read_json(adapter_cfg), adapter_cfg.name
    elif config_path.is_file():
        config, config_name = _read_json(config_path), config_path.name
    ck = Checkpoint(p, fmt, files, where, config=config, metadata=meta, config_name=config_name)
    if not decode or fmt == "peft-adapter":
        return ck
    from .quantized import QuantizedView, detect

    found = detect(p, config)
    if found is None:
        return ck
    view = QuantizedView(ck, *found)
    dense = Checkpoint(p, fmt, files + [view], {n: view for n in view.infos()}, config=config, metadata=meta,
                       config_name=config_name, quantization=view.summary())
    dense.raw = ck
    return dense
