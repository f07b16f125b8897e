"""Score tables (id, score, label, rank, ...), their files (CSV, JSON, Parquet), a histogram,
and pruning: the kept subset for a fraction and a policy."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, MissingDependencyError, OutputExistsError
from ..io.atomic import write_file_atomic
from ..tensor.sample_scores import rank_descending

POLICIES = ("hard", "easy", "random", "auto")
FORMATS = {".csv": "csv", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}
# "auto" keeps the hardest samples when there are at least this many per class (data-abundant)
# and the easiest otherwise. The paper states the direction (abundant -> hard, scarce -> easy),
# not a threshold; this number is weightlab's heuristic.
ABUNDANT_PER_CLASS = 1000


def keep_indices(scores: torch.Tensor, fraction: float, policy: str = "hard", *, skip_hardest: float = 0.0,
                 seed: int = 0, num_classes: int | None = None, abundant_per_class: int = ABUNDANT_PER_CLASS,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted indices of the samples to keep: round(fraction * N) of them.

    - "hard": the highest scores (the Data Diet default), after skipping the `skip_hardest`
      fraction at the very top (those are often mislabeled; the reference's "offset" window);
    - "easy": the lowest scores;
    - "random": a uniform random subset (seeded), the baseline;
    - "auto": "hard" when the data is abundant (N / num_classes >= abundant_per_class), else
      "easy" (Sorscher et al.: keep hard examples with much data, easy ones with little).

    With `labels`, the policy is applied within every class (round(fraction * N_c) kept per
    class), so the kept subset keeps the class balance; easy or hard samples are often
    concentrated in a few classes. Ties are broken by index. +inf scores (never-learned
    examples) count as hardest.
    """
    s = scores.detach().double().reshape(-1)
    n = s.numel()
    if not 0 < fraction <= 1:
        raise ConfigError(f"the kept fraction must be in (0, 1]; got {fraction}")
    if not 0 <= skip_hardest < 1:
        raise ConfigError(f"skip_hardest must be in [0, 1); got {skip_hardest}")
    if policy not in POLICIES:
        raise ConfigError(f"unknown pruning policy {policy!r}; valid: {', '.join(POLICIES)}")
    if policy == "auto":
        if num_classes is None and labels is not None and len(labels):
            num_classes = int(labels.max()) + 1
        per_class = n / max(1, num_classes or 1)
        policy = "hard" if per_class >= abundant_per_class else "easy"
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.numel() != n:
            raise ConfigError(f"{labels.numel()} labels for {n} scores")
        parts = []
        for c in torch.unique(labels):
            idx = torch.nonzero(labels == c).flatten()
            sub = keep_indices(s[idx], fraction, policy, skip_hardest=skip_hardest, seed=seed + int(c))
            parts.append(idx[sub])
        return torch.sort(torch.cat(parts)).values if parts else torch.zeros(0, dtype=torch.long)
    k = max(1, int(round(fraction * n))) if n else 0
    if policy == "random":
        g = torch.Generator().manual_seed(int(seed))
        return torch.sort(torch.randperm(n, generator=g)[:k]).values
    rank = rank_descending(s) - 1  # 0 = hardest
    order = torch.empty_like(rank)
    order[rank] = torch.arange(n)  # indices from hardest to easiest
    if policy == "hard":
        skip = min(int(round(skip_hardest * n)), n - k)
        chosen = order[skip:skip + k]
    else:
        chosen = order[n - k:]
    return torch.sort(chosen).values


@dataclass
class ScoreTable:
    """One score per sample. Higher = harder / more atypical / more likely mislabeled.

    `ids` are row indices into the scored samples (the training split of a zoo dataset, the
    rows of a CSV file). `extra` holds method-specific columns (e.g. forgetting's
    never_learned_runs, prototype's cluster).
    """

    method: str
    scores: torch.Tensor
    labels: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    dataset: str | None = None
    label_names: list | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        self.scores = self.scores.detach().double().reshape(-1)
        n = self.scores.numel()
        if self.ids is None:
            self.ids = torch.arange(n)
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(f"{len(self.labels)} labels for {n} scores")
        for k, v in self.extra.items():
            if len(v) != n:
                raise ValueError(f"extra column {k!r} has {len(v)} values for {n} scores")

    def __len__(self) -> int:
        return self.scores.numel()

    @property
    def rank(self) -> torch.Tensor:
        """1 = highest score (hardest)."""
        return rank_descending(self.scores)

    def _kept_positions(self, fraction: float, policy: str, class_balanced: bool, **kw) -> torch.Tensor:
        if kw.get("num_classes") is None and self.labels is not None and len(self.labels):
            kw["num_classes"] = int(self.labels.max()) + 1
        if class_balanced:
            if self.labels is None:
                raise ConfigError("class-balanced pruning needs labels; this table has none")
            kw["labels"] = self.labels
        return keep_indices(self.scores, fraction, policy, **kw)

    def keep(self, fraction: float, policy: str = "hard", *, class_balanced: bool = False, **kw) -> torch.Tensor:
        """The ids of the kept subset (see keep_indices for the policies and options)."""
        return self.ids[self._kept_positions(fraction, policy, class_balanced, **kw)]

    def add_kept_column(self, fraction: float, policy: str = "hard", *, class_balanced: bool = False,
                        **kw) -> torch.Tensor:
        """Add a boolean `kept` column (the subset keep() would return) and return it."""
        mask = torch.zeros(len(self), dtype=torch.bool)
        mask[self._kept_positions(fraction, policy, class_balanced, **kw)] = True
        self.extra["kept"] = mask
        return mask

    # ------------------------------------------------------------------ rows and files

    def columns(self) -> list[str]:
        cols = ["id", "score"] + (["label"] if self.labels is not None else []) + ["rank"]
        return cols + list(self.extra)

    def rows(self) -> list[dict]:
        """One dict per sample, in id order; scores as Python floats (inf allowed)."""
        cols: dict[str, list] = {"id": self.ids.tolist(), "score": self.scores.tolist()}
        if self.labels is not None:
            lab = self.labels.tolist()
            if self.label_names is not None:
                lab = [self.label_names[i] for i in lab]
            cols["label"] = lab
        cols["rank"] = self.rank.tolist()
        for k, v in self.extra.items():
            cols[k] = v.tolist() if isinstance(v, torch.Tensor) else list(v)
        names = list(cols)
        return [dict(zip(names, vals)) for vals in zip(*cols.values())]

    def summary(self) -> dict:
        s = self.scores
        finite = s[torch.isfinite(s)]
        out = {"method": self.method, "dataset": self.dataset, "samples": len(self), "params": self.params,
               "nonfinite": int((~torch.isfinite(s)).sum())}
        if finite.numel():
            q = torch.quantile(finite, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)).tolist()
            out.update(mean=float(finite.mean()), min=q[0], q25=q[1], median=q[2], q75=q[3], max=q[4])
        if self.seconds is not None:
            out["seconds"] = round(self.seconds, 2)
        return out

    def to_csv(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        cols = self.columns()
        w.writerow(cols)
        for r in self.rows():
            w.writerow([_csv_cell(r[c]) for c in cols])
        return _write_atomic(Path(path), buf.getvalue().encode(), force)

    def to_json(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """JSON (strict: +inf scores, e.g. never-learned examples, are written as null)."""
        head = {"method": self.method, "dataset": self.dataset, "params": self.params,
                "higher_score_means": "harder / more atypical / more likely mislabeled", "columns": self.columns()}
        rows = ",\n".join("  " + json.dumps({k: _json_cell(v) for k, v in r.items()}, allow_nan=False, default=str)
                          for r in self.rows())
        text = json.dumps(head, allow_nan=False, default=str)[:-1] + ',\n "rows": [\n' + rows + "\n ]\n}\n"
        return _write_atomic(Path(path), text.encode(), force)

    def to_parquet(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Parquet via pyarrow (or pandas with a Parquet engine); neither is a weightlab dependency."""
        path = Path(path)
        _check_target(path, force)
        cols = {c: [r[c] for r in self.rows()] for c in self.columns()}
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            pa = None

        def write(tmp):
            if pa is not None:
                pq.write_table(pa.table(cols), tmp)
                return
            try:
                import pandas as pd

                pd.DataFrame(cols).to_parquet(tmp)
            except ImportError:
                raise MissingDependencyError("pyarrow", "Writing scores as Parquet") from None

        return write_file_atomic(path, writer=write)

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write by file extension: .csv, .json or .parquet."""
        path = Path(path)
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise ConfigError(f"unknown output format '{path.suffix}' for {path}; use .csv, .json or .parquet")
        return getattr(self, f"to_{fmt}")(path, force=force)

    def plot(self, path: str | os.PathLike, *, force: bool = False, highlight: torch.Tensor | None = None,
             highlight_label: str = "highlighted", bins: int = 50) -> Path:
        """A histogram of the finite scores as PNG/SVG/PDF (needs matplotlib: pip install 'weightlab[plot]').

        `highlight` (a boolean mask, e.g. known-noisy labels) is drawn as a second histogram.
        """
        path = Path(path)
        _check_target(path, force)
        plt = pyplot()
        s = self.scores
        fin = torch.isfinite(s)
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        edges = None
        if fin.any():
            lo, hi = float(s[fin].min()), float(s[fin].max())
            edges = torch.linspace(lo, hi if hi > lo else lo + 1, bins + 1).tolist()
        if highlight is None:
            ax.hist(s[fin].numpy(), bins=edges or bins, color="tab:blue")
        else:
            h = highlight.bool()
            ax.hist(s[fin & ~h].numpy(), bins=edges or bins, alpha=0.6, label="others", color="tab:blue")
            ax.hist(s[fin & h].numpy(), bins=edges or bins, alpha=0.6, label=highlight_label, color="tab:red")
            ax.legend()
        n_inf = int((~fin).sum())
        title = f"{self.method} scores" + (f" on {self.dataset}" if self.dataset else "") + f" (n={len(self)})"
        if n_inf:
            title += f", {n_inf} never learned (inf) not shown"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("score (higher = harder)")
        ax.set_ylabel("samples")
        fig.tight_layout()
        try:
            return write_file_atomic(path, writer=fig.savefig)
        finally:
            plt.close(fig)


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("matplotlib", "Plotting score histograms", "'weightlab[plot]'") from None
    return plt


def _csv_cell(v):
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, bool):
        return int(v)
    return v


def _json_cell(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _check_target(path: Path, force: bool) -> None:
    if path.is_dir():
        raise OutputExistsError(f"{path} is a folder; give a file name")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; pass --force (force=True) to replace it")
    if not path.parent.is_dir():
        raise ConfigError(f"the folder {path.parent} does not exist")


def _write_atomic(path: Path, data: bytes, force: bool) -> Path:
    _check_target(path, force)
    write_file_atomic(path, data)
    return path
