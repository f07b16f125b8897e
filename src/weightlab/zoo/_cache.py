"""Where the zoo keeps what it builds, and how it writes there without half-files.

Converted models, extracted text and trained classifiers are cached so a second call is
instant. Every write goes to a temporary name beside the target and is renamed into
place, so an interrupted run (or two runs racing) never leaves a truncated file or a
half-filled folder that a later call would mistake for a finished one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def cache_dir() -> Path:
    """The zoo's cache folder: $WEIGHTLAB_CACHE if set, else ~/.cache/weightlab."""
    env = os.environ.get("WEIGHTLAB_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "weightlab"
    root.mkdir(parents=True, exist_ok=True)
    return root


def key_hash(**params) -> str:
    """Short stable hash of keyword arguments, for cache file names."""
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o644)  # mkstemp makes 0600; cached files are not secrets
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(target: Path, data) -> None:
    with atomic_file(target) as tmp:
        tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; on success rename it to `target`.

    If another process finished the same folder first, its copy is kept and ours is
    dropped: both were built from the same inputs.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700
    try:
        yield tmp
        for path in tmp.rglob("*"):  # some writers create 0600 files
            if path.is_file():
                os.chmod(path, 0o644)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
