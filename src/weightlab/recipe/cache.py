"""Content keys for recipe steps: a finished step is found again by the hash of everything it depends on.

key(step k) = sha256(key(step k-1), step k's family, method and validated parameters); key(0) is the
content of the input model (every file's bytes; remembered per (path, size, mtime) so an unchanged
model is hashed once). Changing a step, or anything before it, changes its key and every later one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .._version import __version__

CHUNK = 1 << 22


def _file_digest(p: Path, memo: dict) -> str:
    st = p.stat()
    k = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if k not in memo:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
        memo[k] = h.hexdigest()
    return memo[k]


def model_key(path: Path, memo_file: Path | None = None) -> str:
    """sha256 over the names and contents of the model's regular files (a folder or one file)."""
    memo = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()
                                                 or p.is_symlink() and p.resolve().is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(_file_digest(f, memo).encode())
    if memo_file is not None:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    return h.hexdigest()


def step_keys(first: str, steps) -> list[str]:
    """One key per (spec, config) step, chained from ``first``."""
    keys, prev = [], first
    for spec, cfg in steps:
        blob = json.dumps({"prev": prev, "family": spec.family, "method": spec.name,
                           "params": cfg.model_dump(mode="json"), "weightlab": __version__}, sort_keys=True)
        prev = hashlib.sha256(blob.encode()).hexdigest()
        keys.append(prev)
    return keys
