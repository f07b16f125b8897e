"""Streaming regime: read one tensor at a time from a source, write it out at once."""
from __future__ import annotations

import os
from pathlib import Path

from ..io.provenance import Provenance
from ..io.writer import CheckpointWriter
from .progress import progress
from .source import root_path


def write_source(source, out_dir: str | os.PathLike, *, provenance: Provenance | None = None,
                 template: str | os.PathLike | None = None, inputs=(), force: bool = False,
                 max_shard_size: int | str = "5GB", dtype=None, extra_files: dict | None = None,
                 show_progress: bool | None = None) -> Path:
    """Write every tensor of ``source`` into an atomic, sharded HF-style folder."""
    origin = root_path(source)
    if template is None and origin is not None:
        template = origin
    ins = list(inputs) + ([origin] if origin is not None else [])
    names = source.names()
    with CheckpointWriter(out_dir, provenance=provenance, template=template, inputs=ins, force=force,
                          max_shard_size=max_shard_size, dtype=dtype) as w:
        for name, content in (extra_files or {}).items():
            w.add_file(name, content)
        for name in progress(names, "writing tensors", enabled=show_progress):
            w.add(name, source.get(name))
    return w.out
