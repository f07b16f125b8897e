"""The safetensors file layout, validated strictly before any tensor is touched.

Layout: 8-byte little-endian header length N, N bytes of JSON, then the data region.
Each JSON entry is {"dtype", "shape", "data_offsets": [begin, end]} relative to the data
region; "__metadata__" maps str -> str. We check every offset against the real file size
so a truncated download is reported as such instead of failing deep inside a merge.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptCheckpointError, TruncatedCheckpointError
from .dtypes import ITEMSIZE

MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # offsets inside the data region
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int  # absolute file offset of the data region


def parse_header(prefix: bytes, file_size: int, path: str | Path = "<bytes>") -> SafetensorsHeader:
    """Parse and validate a header. ``prefix`` must hold at least the 8+N header bytes.

    Raises only CorruptCheckpointError / TruncatedCheckpointError.
    """
    if file_size < 8 or len(prefix) < 8:
        raise TruncatedCheckpointError(
            f"file is {file_size} bytes, too short for a safetensors header (truncated download?)", path
        )
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER:
        raise CorruptCheckpointError(f"header length {n} is implausible (corrupt safetensors file)", path)
    if 8 + n > file_size:
        raise TruncatedCheckpointError(
            f"header says {n} header bytes but the file has {file_size - 8} after the length field "
            "(truncated file?)", path)
    if len(prefix) < 8 + n:
        raise ValueError("prefix does not contain the whole header")
    raw = prefix[8:8 + n]
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise CorruptCheckpointError("safetensors header names a tensor twice (the safetensors library refuses "
                                     "it too)", path, str(e)) from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        # ValueError: an integer of over 4,300 digits (Python's int-conversion limit)
        raise CorruptCheckpointError(f"safetensors header is not valid JSON ({e.__class__.__name__})", path) from None
    if not isinstance(obj, dict):
        raise CorruptCheckpointError("safetensors header is not a JSON object", path)

    metadata: dict[str, str] = {}
    entries: dict[str, TensorEntry] = {}
    data_size = file_size - 8 - n
    for name, spec in obj.items():
        if name == "__metadata__":
            if spec is None:
                continue
            if not isinstance(spec, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in spec.items()):
                raise CorruptCheckpointError("__metadata__ must map strings to strings", path)
            metadata = dict(spec)
            continue
        entries[name] = _entry(name, spec, path)

    spans = sorted((e.begin, e.end, e.name) for e in entries.values())
    pos = 0
    for begin, end, name in spans:
        if begin < pos:
            raise CorruptCheckpointError("data_offsets overlap another tensor", path, name)
        if begin > pos:  # the safetensors library refuses holes: the tensors must tile the data region
            raise CorruptCheckpointError(f"{begin - pos} unused bytes before this tensor's data (a gap in the data "
                                         "region; the safetensors library refuses such files)", path, name)
        pos = end
    if pos > data_size:
        last = max(spans, key=lambda s: s[1])[2]
        raise TruncatedCheckpointError(
            f"tensor data ends at byte {pos} of the data region but the file holds only {data_size} "
            "(truncated download or copy; re-fetch the file)", path, last)
    if pos < data_size:
        raise CorruptCheckpointError(f"{data_size - pos} bytes after the last tensor's data (trailing bytes; the "
                                     "safetensors library refuses such files)", path)
    return SafetensorsHeader(entries, metadata, 8 + n)


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


MAX_DIM = 2 ** 62  # beyond this no byte count or torch size is representable


def _entry(name: str, spec: object, path: str | Path) -> TensorEntry:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape: no file or library can store it
        raise CorruptCheckpointError("tensor name is not valid Unicode (a lone surrogate escape)", path,
                                     name.encode("utf-8", "backslashreplace").decode()) from None
    if "\x00" in name:
        raise CorruptCheckpointError("tensor name contains a NUL character", path, name.replace("\x00", "\\0"))
    if not isinstance(spec, dict):
        raise CorruptCheckpointError("tensor entry is not an object", path, name)
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise CorruptCheckpointError(f"unsupported or missing dtype {dtype!r}", path, name)
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CorruptCheckpointError(f"shape must be a list of non-negative integers, got {shape!r}", path, name)
    if any(d > MAX_DIM for d in shape) or math.prod(d for d in shape if d) > MAX_DIM:
        raise CorruptCheckpointError(f"shape {shape} is implausibly large (corrupt header)", path, name)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[1] < offsets[0]):
        raise CorruptCheckpointError(f"data_offsets must be [begin, end] with begin <= end, got {offsets!r}", path, name)
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != expected:
        raise CorruptCheckpointError(
            f"data_offsets span {offsets[1] - offsets[0]} bytes but shape {shape} of {dtype} needs {expected}",
            path, name)
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def read_header(path: Path) -> SafetensorsHeader:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            if 8 + n <= size and n <= MAX_HEADER:
                head += f.read(n)
    return parse_header(head, size, path)


def build_header(entries: list[tuple[str, str, tuple[int, ...], int, int]], metadata: dict[str, str] | None) -> bytes:
    """Serialize a header (length prefix included), padded to 8 bytes as the spec asks."""
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dtype, shape, begin, end in entries:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw
