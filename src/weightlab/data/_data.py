"""The samples to score: a zoo dataset's training split or a user CSV, plus label-noise injection."""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError

ZOO_DATASETS = ("digits", "mnist1d", "wine", "breast_cancer")


@dataclass
class ScoringData:
    """Training samples to score: float32 features (N, D), int64 labels (N,) in 0..K-1.

    `label_names[k]` is the original label of class k (CSV files may use any label values);
    `source_ids` is a CSV's own `id` column, if it had one.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str = "data"
    label_names: list | None = None
    source_ids: list | None = None
    feature_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ConfigError(f"scoring data needs features (N, D) and labels (N,); got {tuple(self.x.shape)} "
                              f"and {tuple(self.y.shape)}")
        if len(self.y) and (int(self.y.min()) < 0 or int(self.y.max()) >= self.num_classes):
            raise ConfigError(f"labels must lie in 0..{self.num_classes - 1}")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])

    def with_labels(self, y: torch.Tensor) -> "ScoringData":
        """The same samples with other labels (e.g. after injecting label noise)."""
        return ScoringData(self.x, y.long(), self.num_classes, self.name, self.label_names, self.source_ids,
                           self.feature_names)

    @classmethod
    def from_dataset(cls, ds) -> "ScoringData":
        """The training split of a zoo Dataset (or anything with x_train, y_train, num_classes)."""
        return cls(ds.x_train.float(), ds.y_train.long(), int(ds.num_classes), getattr(ds, "name", "data"))


def as_scoring_data(data) -> ScoringData:
    """Accept ScoringData, a zoo Dataset, a zoo dataset name or a CSV path."""
    if isinstance(data, ScoringData):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_scoring_data(data)
    if hasattr(data, "x_train") and hasattr(data, "y_train"):
        return ScoringData.from_dataset(data)
    raise ConfigError(f"cannot score {type(data).__name__}: give a dataset name ({', '.join(ZOO_DATASETS)}), "
                      "a CSV path, a zoo Dataset or ScoringData")


def load_scoring_data(name_or_path: str | os.PathLike, seed: int | None = None) -> ScoringData:
    """A zoo dataset's training split by name, or a CSV file of numeric features plus a `label` column."""
    s = str(name_or_path)
    if s in ZOO_DATASETS and not Path(s).is_file():
        from ..zoo.tabular import load_dataset

        return ScoringData.from_dataset(load_dataset(s, seed=seed))
    p = Path(s)
    if not p.is_file():
        raise ConfigError(f"dataset '{s}' is neither a zoo dataset ({', '.join(ZOO_DATASETS)}) nor an existing "
                          "CSV file")
    return read_csv_data(p)


def _label_key(v: str):
    try:
        return (0, float(v), v)
    except ValueError:
        return (1, 0.0, v)


def read_csv_data(path: str | os.PathLike, label_column: str = "label") -> ScoringData:
    """Numeric feature columns plus a label column; features standardised (zero mean, unit variance).

    A column named `id` is not a feature; its values are kept as `source_ids`. Labels may be
    any strings or numbers; classes are numbered in sorted label order.
    """
    p = Path(path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a UTF-8 text CSV file") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise ConfigError(f"{p}: the CSV file is empty")
    header = [h.strip() for h in rows[0]]
    if label_column not in header:
        raise ConfigError(f"{p}: no '{label_column}' column; columns are: {', '.join(header)}")
    if len(set(header)) != len(header):
        raise ConfigError(f"{p}: duplicate column names in the header")
    li = header.index(label_column)
    id_i = header.index("id") if "id" in header else None
    feat_idx = [i for i in range(len(header)) if i not in (li, id_i)]
    if not feat_idx:
        raise ConfigError(f"{p}: no feature columns besides '{label_column}'")
    data = rows[1:]
    if len(data) < 2:
        raise ConfigError(f"{p}: needs at least 2 data rows, found {len(data)}")
    feats, labels, ids = [], [], []
    for r, row in enumerate(data, start=2):
        if len(row) != len(header):
            raise ConfigError(f"{p}: line {r} has {len(row)} fields, the header has {len(header)}")
        vals = []
        for i in feat_idx:
            cell = row[i].strip()
            try:
                v = float(cell)
            except ValueError:
                raise ConfigError(f"{p}: line {r}, column '{header[i]}': {cell!r} is not a number") from None
            if not math.isfinite(v):
                raise ConfigError(f"{p}: line {r}, column '{header[i]}': {cell!r} is not a finite number")
            vals.append(v)
        lab = row[li].strip()
        if lab == "":
            raise ConfigError(f"{p}: line {r}: the label is empty")
        feats.append(vals)
        labels.append(lab)
        if id_i is not None:
            ids.append(row[id_i].strip())
    names = sorted(set(labels), key=_label_key)
    if len(names) < 2:
        raise ConfigError(f"{p}: the '{label_column}' column has only one class ({names[0]!r})")
    index = {n: k for k, n in enumerate(names)}
    x = torch.tensor(feats, dtype=torch.float64)
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std[std < 1e-8] = 1.0
    x = ((x - mean) / std).float()
    y = torch.tensor([index[v] for v in labels], dtype=torch.long)
    label_names = [_as_number(n) for n in names]
    return ScoringData(x, y, len(names), p.name, label_names, ids or None, [header[i] for i in feat_idx])


def _as_number(v: str):
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


def inject_label_noise(y: torch.Tensor, fraction: float, num_classes: int, seed: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy labels, mask of changed samples): round(fraction * N) samples get a different class, uniformly."""
    if not 0 <= fraction <= 1:
        raise ConfigError(f"the label-noise fraction must be in [0, 1]; got {fraction}")
    if num_classes < 2:
        raise ConfigError("label noise needs at least 2 classes")
    g = torch.Generator().manual_seed(int(seed))
    n = len(y)
    idx = torch.randperm(n, generator=g)[: int(round(fraction * n))]
    shift = torch.randint(1, num_classes, (len(idx),), generator=g)
    noisy = y.clone().long()
    noisy[idx] = (noisy[idx] + shift) % num_classes
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return noisy, mask
