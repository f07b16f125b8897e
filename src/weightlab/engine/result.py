"""What every verb returns: ``.as_dict()`` (JSON-able) and ``.save(path)`` (that JSON, written atomically)."""
from __future__ import annotations

import json
import os
from pathlib import Path


class Result:
    def as_dict(self) -> dict:  # each result says what it holds
        raise NotImplementedError

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write ``as_dict()`` as JSON to ``path`` atomically; an existing file needs ``force``."""
        from ..errors import OutputExistsError
        from ..io.atomic import write_file_atomic

        path = Path(path)
        if path.exists() and not force:
            raise OutputExistsError(f"'{path}' already exists; pass force=True to replace it")
        return write_file_atomic(path, json.dumps(self.as_dict(), indent=1, default=str) + "\n")
