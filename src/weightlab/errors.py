"""Typed errors. Every error a user can cause derives from WeightlabError.

The CLI prints these as one clear message (no traceback) and exits non-zero; anything
else escaping the library is a bug and keeps its traceback.
"""
from __future__ import annotations

from pathlib import Path


class WeightlabError(Exception):
    """Base for errors caused by input, configuration or environment."""


class ConfigError(WeightlabError, ValueError):
    """A recipe, method name or parameter is invalid."""


class MissingDependencyError(WeightlabError, ImportError):
    """An optional package is needed; the message names the pip command."""

    def __init__(self, package: str, purpose: str, pip_args: str | None = None):
        self.package = package
        cmd = pip_args or package
        super().__init__(f"{purpose} needs the package '{package}'. Install it with: pip install {cmd}")


class OutputExistsError(WeightlabError, FileExistsError):
    """The output path exists (and --force was not given) or would overwrite an input."""


class CheckpointError(WeightlabError):
    """A checkpoint cannot be read. Names the file and, where known, the tensor."""

    def __init__(self, message: str, path: str | Path | None = None, tensor: str | None = None):
        self.path = str(path) if path is not None else None
        self.tensor = tensor
        where = ""
        if self.path:
            where += f"{self.path}"
        if tensor:
            where += f" [tensor '{tensor}']"
        super().__init__(f"{where}: {message}" if where else message)


class UnsupportedFormatError(CheckpointError):
    """The path is not a checkpoint format weightlab reads."""


class CorruptCheckpointError(CheckpointError):
    """The file's structure is invalid (bad header, bad offsets, bad index)."""


class TruncatedCheckpointError(CorruptCheckpointError):
    """The file is shorter than its header says: an interrupted download or copy."""


class MissingShardError(CorruptCheckpointError):
    """An index names a shard that is missing or lies outside the checkpoint folder."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle contains something other than tensors and plain containers."""


class TensorValueError(CheckpointError):
    """A tensor holds NaN/Inf or has the wrong shape/dtype for the operation."""
