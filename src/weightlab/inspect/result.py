"""What ``analyze`` returns: row tables with JSON and HTML output."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from ..errors import MissingDependencyError
from ..io.atomic import write_file_atomic

class Table(list):
    """A list of row dicts; ``to_pandas()`` makes a DataFrame when pandas is installed."""

    def to_pandas(self):
        try:
            import pandas as pd
        except ImportError:
            raise MissingDependencyError("pandas", "Table.to_pandas()") from None
        return pd.DataFrame(list(self))

    def column(self, key: str) -> list:
        return [r.get(key) for r in self]


class InspectResult(Table):
    """Per-layer rows (a Table), plus ``diff`` (a Table, empty without a base), ``summary`` and ``spectra``.

    ``spectra`` maps a layer name to its ESD (numpy, ascending; for plots). ``to_dict()`` is the
    JSON document ``{"layers", "diff", "summary"}``; ``write_html(path)`` writes the report.
    """

    def __init__(self, layers: list[dict], diff: list[dict], summary: dict, spectra: dict[str, np.ndarray]):
        super().__init__(layers)
        self.diff = Table(diff)
        self.summary = summary
        self.spectra = spectra

    def to_dict(self) -> dict:
        return {"layers": list(self), "diff": list(self.diff), "summary": self.summary}

    def as_dict(self) -> dict:  # the verbs' common name
        return _jsonable(self.to_dict())

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """``to_json`` into ``path`` (atomically); an existing file needs ``force``."""
        from ..errors import OutputExistsError

        if Path(path).exists() and not force:
            raise OutputExistsError(f"'{path}' already exists; pass force=True to replace it")
        self.to_json(path)
        return Path(path)

    def to_json(self, path: str | os.PathLike | None = None, indent: int | None = 1) -> str:
        text = json.dumps(_jsonable(self.to_dict()), indent=indent, allow_nan=False)
        if path is not None:
            write_file_atomic(Path(path), text + "\n")
        return text

    def write_html(self, path: str | os.PathLike, *, title: str | None = None,
                   plot_layers: list[str] | None = None, sections: list[str] | None = None) -> Path:
        from .report import write_report

        return write_report(self, path, title=title, plot_layers=plot_layers, sections=sections)

    def __repr__(self) -> str:
        s = self.summary
        extra = f", diff of {len(self.diff)} tensors" if self.diff else ""
        med = s.get("median_alpha")
        return (f"InspectResult({len(self)} layers, median alpha {med:.3f}{extra})" if med is not None else
                f"InspectResult({len(self)} layers{extra})")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


