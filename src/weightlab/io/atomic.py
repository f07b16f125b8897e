"""Atomic output folders: build in a hidden temporary folder beside the target, rename at the end.

A crash, a kill or a full disk leaves at most a hidden ``.NAME.weightlab-tmp-PID-*`` folder
(removed by the next writer once PID is gone), never a half-written folder under NAME.
Replacing an existing NAME (``force``) swaps the two folders in one atomic rename where the
kernel offers it (Linux renameat2 RENAME_EXCHANGE); elsewhere the old folder is first renamed
to ``.NAME.weightlab-old-PID-*``, and a writer that finds one from a dead process with no NAME
puts it back (a kill between the two renames loses nothing) or, with NAME present, removes it.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from ..errors import OutputExistsError


def check_not_input(out: Path, inputs) -> None:
    """Refuse an output that equals, lies inside, or contains an input."""
    o = Path(out).expanduser().resolve()
    for inp in inputs:
        if inp is None:
            continue
        i = Path(inp).expanduser().resolve()
        if o == i or i in o.parents or o in i.parents:
            raise OutputExistsError(
                f"output '{out}' would write into or over the input '{inp}'; choose another output path")


class AtomicFolder:
    """``with AtomicFolder(out) as tmp: ...write into tmp...`` publishes ``out`` on success."""

    def __init__(self, out: str | os.PathLike, *, force: bool = False, inputs=()):
        self.out = Path(out).expanduser()
        self.force = force
        check_not_input(self.out, inputs)
        if self.out.exists() and not force:
            raise OutputExistsError(f"output '{self.out}' already exists; pass --force (force=True) to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(self.out)
        self.tmp = self.out.parent / f".{self.out.name}.weightlab-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self.done = False

    def publish(self) -> Path:
        if self.done:
            return self.out
        old = None
        if self.out.exists():
            if not self.force:
                raise OutputExistsError(f"output '{self.out}' appeared while writing; nothing was replaced")
            if _exchange(self.tmp, self.out):  # one atomic step: NAME is never missing
                shutil.rmtree(self.tmp, ignore_errors=True) if self.tmp.is_dir() else self.tmp.unlink()
                self.done = True
                return self.out
            old = self.out.parent / f".{self.out.name}.weightlab-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, old)
        try:
            os.rename(self.tmp, self.out)
        except OSError:
            if old is not None:
                os.rename(old, self.out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        self.done = True
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.done = True

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.publish()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def _clean_stale(out: Path) -> None:
    for kind in ("tmp", "old"):
        for p in out.parent.glob(f".{out.name}.weightlab-{kind}-*"):
            try:
                pid = int(p.name.rsplit("-", 2)[1])
            except (ValueError, IndexError):
                continue
            if pid == os.getpid() or _alive(pid):
                continue
            if kind == "old" and not out.exists():  # killed between the two renames: restore the old output
                os.rename(p, out)
            else:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), exchange) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_file_atomic(path, data: str | bytes | None = None, *, writer=None) -> Path:
    """Write one file atomically: into a hidden temporary file beside it, then rename.

    Give ``data`` (text is written as UTF-8) or ``writer(tmp_path)`` for libraries that write
    files themselves. A reader never sees half a file; a failure leaves the old file, if any.
    """
    import tempfile

    from ..errors import ConfigError

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"'{path}' is a folder; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the suffix: writers such as matplotlib pick the format from it
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".weightlab-tmp{path.suffix}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if data is not None:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        if writer is not None:
            writer(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
