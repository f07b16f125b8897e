"""One file of tensors, read lazily: a safetensors file (memory-mapped, header checked) or a pickled
PyTorch state dict (only through ``torch.load(weights_only=True)``). ``reader`` builds checkpoints
from these."""
from __future__ import annotations

import mmap
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CorruptCheckpointError, UnsafeCheckpointError, UnsupportedFormatError
from .dtypes import ST_TO_TORCH, dtype_name
from .safetensors_format import SafetensorsHeader, read_header

TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
FAULT_AROUND = 64 * 1024  # Linux maps up to this many bytes of cached file pages around a read fault


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": dtype_name(self.dtype)}


class _SafetensorsFile:
    """One .safetensors file, memory-mapped on first tensor access (copy-on-write)."""

    def __init__(self, path: Path):
        self.path = path
        self.header: SafetensorsHeader = read_header(path)
        self._mm: mmap.mmap | None = None
        # file order of the tensors and which are released, so a release can also drop its released neighbours'
        # pages: the kernel maps up to 64 KiB of cached pages around each read fault ("fault-around"), which
        # re-maps the tail of the tensor released just before; unmerged, these strays grew RSS with depth
        self._order = sorted(self.header.entries, key=lambda n: self.header.entries[n].begin)
        self._index = {n: i for i, n in enumerate(self._order)}
        self._released = [self.header.entries[n].nbytes == 0 for n in self._order]

    def infos(self) -> dict[str, TensorInfo]:
        return {n: TensorInfo(n, e.shape, ST_TO_TORCH[e.dtype], self.path.name) for n, e in self.header.entries.items()}

    def get(self, name: str) -> torch.Tensor:
        e = self.header.entries[name]
        dtype = ST_TO_TORCH[e.dtype]
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=dtype)
        if self._mm is None:
            size = self.path.stat().st_size
            if size < self.header.data_start + max(x.end for x in self.header.entries.values()):
                raise CorruptCheckpointError("file shrank after it was opened", self.path, name)
            with open(self.path, "rb") as f:
                # ACCESS_COPY: pages are shared with the page cache for reading, but a caller
                # that writes into a returned tensor can never modify the file.
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._released[self._index[name]] = False  # live again: its pages are not dropped with a neighbour's
        start = self.header.data_start + e.begin
        itemsize = torch.empty((), dtype=dtype).element_size()
        if start % itemsize:
            buf = bytearray(self._mm[start:start + e.nbytes])  # misaligned: copy
            return torch.frombuffer(buf, dtype=dtype).reshape(e.shape)
        return torch.frombuffer(self._mm, dtype=dtype, count=e.nbytes // itemsize, offset=start).reshape(e.shape)

    def release(self, name: str) -> None:
        """Tell the kernel the pages of this tensor are no longer needed (re-read if touched again).

        Whole pages only: a page shared with a tensor that is not released is kept, so a caller's
        in-place edits of a live tensor (copy-on-write pages) are never dropped. Released neighbours
        within the fault-around reach are dropped along with it.
        """
        if self._mm is None or not hasattr(self._mm, "madvise"):
            return
        i = self._index[name]
        self._released[i] = True
        entries, order, reach, page = self.header.entries, self._order, FAULT_AROUND, mmap.PAGESIZE
        first, last = entries[order[i]].begin, entries[order[i]].end
        lo = hi = i
        while lo > 0 and self._released[lo - 1] and first - entries[order[lo]].begin < reach:
            lo -= 1
        while hi + 1 < len(order) and self._released[hi + 1] and entries[order[hi]].end - last < reach:
            hi += 1
        d = self.header.data_start
        start, end = d + entries[order[lo]].begin, d + entries[order[hi]].end
        # round outwards only where the neighbour beyond is released too (or there is none)
        start = start // page * page if lo == 0 or self._released[lo - 1] else -(-start // page) * page
        end = -(-end // page) * page if hi + 1 == len(order) or self._released[hi + 1] else end // page * page
        start = max(start, (d + first - reach) // page * page)  # no further than the fault-around reach
        end = min(end, -(-(d + last + reach) // page) * page, len(self._mm))
        if end > start:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (OSError, ValueError):
                pass


class _TorchFile:
    """A pickled state dict, read only through torch.load(weights_only=True)."""

    def __init__(self, path: Path):
        self.path = path
        self.extra: dict[str, object] = {}
        obj = _safe_torch_load(path)
        sd = _unwrap_state_dict(obj, path)
        self.tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        self.extra = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}

    def infos(self) -> dict[str, TensorInfo]:
        return {n: TensorInfo(n, tuple(t.shape), t.dtype, self.path.name) for n, t in self.tensors.items()}

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def _safe_torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            "refused to unpickle: the file contains objects other than tensors and plain containers "
            f"({str(e).splitlines()[0] if str(e) else 'unsafe global'}). weightlab never runs arbitrary "
            "pickle code; convert the checkpoint to safetensors with a trusted tool if you trust its source.",
            path) from None
    except RuntimeError as e:
        msg = str(e)
        if "mmap" in msg or "zipfile" in msg.lower() and "legacy" in msg.lower():
            try:  # legacy (pre-zip) serialization cannot be memory-mapped
                return torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e2:
                raise UnsafeCheckpointError(f"refused to unpickle: {str(e2).splitlines()[0]}", path) from None
            except Exception as e2:  # noqa: BLE001 - any failure here means the file is damaged
                raise CorruptCheckpointError(f"cannot read PyTorch file: {str(e2).splitlines()[0]}", path) from None
        raise CorruptCheckpointError(
            f"cannot read PyTorch file (truncated or corrupt?): {msg.splitlines()[0] if msg else e!r}", path) from None
    except (EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError) as e:
        raise CorruptCheckpointError(f"cannot read PyTorch file (truncated or corrupt?): {e}", path) from None


def _unwrap_state_dict(obj: object, path: Path) -> dict:
    if not isinstance(obj, dict):
        raise UnsupportedFormatError(f"expected a state dict (a dict of tensors), found {type(obj).__name__}", path)
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    for k in obj:
        if not isinstance(k, str):
            raise UnsupportedFormatError(f"state dict key {k!r} is not a string", path)
    return obj
