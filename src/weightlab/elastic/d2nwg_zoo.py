"""D2NWG's model zoo at CPU scale: tasks made of class subsets of a zoo dataset, and tiny MLPs trained on them.

A task is (dataset, classes); its labels are the classes relabelled in sorted order (class c_j -> label j).
Its data comes from the dataset's default split: the training part is divided once more into a fit part
(training and the dataset condition) and a validation part (choosing among generated samples), so the test
part is only ever used for reporting.

All models of a zoo have one architecture and are trained *at once*: their weights are stacked along a
leading model axis and the forward is a batched matmul. Adam is elementwise, so one Adam over the stacked
weights with the sum of the per-model mean losses is exactly one Adam per model (a test checks it against
``zoo.train_classifier``-style single training). This is what makes a zoo of hundreds of models, and the
benchmark's fine-tuning runs, take seconds on a CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.nn import functional as F

from ..errors import ConfigError
from ..zoo import load_dataset


@dataclass(frozen=True)
class Layout:
    """A tiny MLP in_features -> hidden... -> num_classes (ReLU), named like ``zoo.MLP`` (body.0, body.2, ...)."""

    in_features: int
    hidden: tuple[int, ...]
    num_classes: int

    @property
    def widths(self) -> list[int]:
        return [self.in_features, *self.hidden, self.num_classes]

    @property
    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        out, w = [], self.widths
        for i in range(len(w) - 1):
            out += [(f"body.{2 * i}.weight", (w[i + 1], w[i])), (f"body.{2 * i}.bias", (w[i + 1],))]
        return out

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors)


def vectorize(state: dict[str, torch.Tensor], layout: Layout) -> torch.Tensor:
    """Model-wise vectorization: the layout's tensors flattened and concatenated in order (float32)."""
    missing = [n for n, _ in layout.tensors if n not in state]
    if missing:
        raise ConfigError(f"state dict lacks {missing}; expected an MLP with tensors {[n for n, _ in layout.tensors]}")
    parts = []
    for n, shape in layout.tensors:
        if tuple(state[n].shape) != shape:
            raise ConfigError(f"tensor {n} has shape {tuple(state[n].shape)}, the generator's layout needs {shape}")
        parts.append(state[n].detach().reshape(-1).float())
    return torch.cat(parts)


def unvectorize(vec: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Inverse of ``vectorize`` for one vector (P,) or a stack (M, P): tensors with a leading model axis."""
    if vec.shape[-1] != layout.numel:
        raise ConfigError(f"weight vector has {vec.shape[-1]} entries, the layout {layout.widths} needs {layout.numel}")
    out, pos = {}, 0
    for n, shape in layout.tensors:
        k = math.prod(shape)
        out[n] = vec[..., pos:pos + k].reshape(*vec.shape[:-1], *shape).clone()
        pos += k
    return out


def forward(vecs: torch.Tensor, x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Logits of M stacked models: vecs (M, P), x (M, B, F) or (B, F) shared -> (M, B, C)."""
    p = unvectorize_view(vecs, layout)
    h = x if x.dim() == 3 else x.expand(vecs.shape[0], *x.shape)
    n = len(layout.widths) - 1
    for i in range(n):
        h = torch.baddbmm(p[2 * i + 1].unsqueeze(1), h, p[2 * i].transpose(1, 2))
        if i < n - 1:
            h = F.relu(h)
    return h


def unvectorize_view(vecs: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Views (no copy, gradients flow) of the layout's tensors in a (M, P) stack."""
    out, pos = [], 0
    for _, shape in layout.tensors:
        k = math.prod(shape)
        out.append(vecs[:, pos:pos + k].reshape(vecs.shape[0], *shape))
        pos += k
    return out


def init_vectors(layout: Layout, n: int, gen: torch.Generator) -> torch.Tensor:
    """n random inits with nn.Linear's default distribution: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for W and b."""
    parts = []
    for name, shape in layout.tensors:
        bound = 1.0 / math.sqrt(_fan_in(layout, name))
        parts.append((torch.rand(n, math.prod(shape), generator=gen) * 2 - 1) * bound)
    return torch.cat(parts, 1)


def _fan_in(layout: Layout, name: str) -> int:
    return layout.widths[int(name.split(".")[1]) // 2]  # body.{2i}.* reads widths[i] features


@dataclass
class Task:
    """A class subset of a zoo dataset, relabelled in sorted order, with fit / val / test parts."""

    dataset: str
    classes: tuple[int, ...]
    x_fit: torch.Tensor
    y_fit: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def name(self) -> str:
        return f"{self.dataset}:{','.join(map(str, self.classes))}"

    def by_class(self) -> list[torch.Tensor]:
        """The fit samples of each label, in label order (what the dataset condition draws from)."""
        return [self.x_fit[self.y_fit == j] for j in range(len(self.classes))]


def _relabel(x: torch.Tensor, y: torch.Tensor, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.isin(y, torch.tensor(classes, dtype=y.dtype))
    lut = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    lut[torch.tensor(classes)] = torch.arange(len(classes))
    return x[keep], lut[y[keep]]


def make_task(dataset: str, classes: Sequence[int], val_fraction: float = 0.2) -> Task:
    """The task ``dataset:classes`` (sorted, distinct); val is a fixed stratified share of the training part."""
    data = load_dataset(dataset)
    cls = tuple(sorted(int(c) for c in classes))
    if len(set(cls)) != len(cls) or len(cls) < 2:
        raise ConfigError(f"a task needs at least 2 distinct classes, got {tuple(classes)}")
    if cls[0] < 0 or cls[-1] >= data.num_classes:
        raise ConfigError(f"{dataset} has classes 0..{data.num_classes - 1}; got {cls}")
    x, y = _relabel(data.x_train, data.y_train, cls)
    xt, yt = _relabel(data.x_test, data.y_test, cls)
    g = torch.Generator().manual_seed(1234)  # one fixed fit/val division for every caller
    val = torch.zeros(len(y), dtype=torch.bool)
    for j in range(len(cls)):
        idx = (y == j).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        val[idx[:max(1, round(val_fraction * len(idx)))]] = True
    return Task(dataset, cls, x[~val], y[~val], x[val], y[val], xt, yt)


def sample_condition(task: Task, k: int, gen: torch.Generator) -> torch.Tensor:
    """(C, K, F): K fit samples per label, drawn without replacement (with, if a class has fewer than K)."""
    out = []
    for xc in task.by_class():
        if len(xc) >= k:
            idx = torch.randperm(len(xc), generator=gen)[:k]
        else:
            idx = torch.randint(len(xc), (k,), generator=gen)
        out.append(xc[idx])
    return torch.stack(out)


def _stack_data(tasks: Sequence[Task]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = max(len(t.y_fit) for t in tasks)
    xs = torch.zeros(len(tasks), n, tasks[0].x_fit.shape[1])
    ys = torch.zeros(len(tasks), n, dtype=torch.long)
    counts = torch.tensor([len(t.y_fit) for t in tasks])
    for i, t in enumerate(tasks):
        xs[i, :len(t.y_fit)], ys[i, :len(t.y_fit)] = t.x_fit, t.y_fit
    return xs, ys, counts


def train_vectors(vecs: torch.Tensor, tasks: Sequence[Task], layout: Layout, steps: int, lr: float,
                  batch_size: int, gen: torch.Generator, record: Sequence[int] = (),
                  evaluate=None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Train M stacked models (vecs (M, P), model i on tasks[i]) with Adam for ``steps`` steps.

    Each step, every model draws its own minibatch of ``batch_size`` fit samples with replacement. Returns the
    trained copy and, for each step count in ``record`` (0 = before training), ``evaluate(vecs)``.
    """
    xs, ys, counts = _stack_data(tasks)
    w = vecs.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    rows = torch.arange(len(tasks)).unsqueeze(1)
    seen = {}
    for step in range(steps + 1):
        if step in record and evaluate is not None:
            seen[step] = evaluate(w.detach())
        if step == steps:
            break
        idx = (torch.rand(len(tasks), batch_size, generator=gen) * counts.unsqueeze(1)).long()
        logits = forward(w, xs[rows, idx], layout)
        # sum over models of each model's mean loss: the gradient of model i is its own loss's gradient
        loss = F.cross_entropy(logits.flatten(0, 1), ys[rows, idx].flatten(), reduction="none")
        opt.zero_grad(set_to_none=True)
        loss.view(len(tasks), batch_size).mean(1).sum().backward()
        opt.step()
    return w.detach(), seen


@torch.no_grad()
def accuracies(vecs: torch.Tensor, tasks: Sequence[Task], layout: Layout, split: str = "test") -> torch.Tensor:
    """Accuracy of model i on tasks[i]'s ``split`` (fit / val / test), as a (M,) tensor."""
    out = torch.empty(len(tasks))
    for i, t in enumerate(tasks):
        x, y = getattr(t, f"x_{split}"), getattr(t, f"y_{split}")
        out[i] = (forward(vecs[i:i + 1], x, layout)[0].argmax(1) == y).float().mean()
    return out


def choose_tasks(num_classes: int, way: int, n_train: int, n_heldout: int, seed: int
                 ) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Disjoint lists of distinct ``way``-subsets of the classes: n_train zoo tasks and n_heldout unseen ones."""
    from itertools import combinations

    allc = list(combinations(range(num_classes), way))
    if n_train + n_heldout > len(allc):
        raise ConfigError(f"{n_train} + {n_heldout} tasks asked, but only {len(allc)} distinct "
                          f"{way}-class subsets of {num_classes} classes exist")
    order = torch.randperm(len(allc), generator=torch.Generator().manual_seed(seed)).tolist()
    picked = [allc[i] for i in order[:n_train + n_heldout]]
    return picked[:n_train], picked[n_train:]


class ConditionPool:
    """The fit samples of many tasks by label, padded into one tensor, so a batch of conditions is one draw.

    ``draw(task_ids, k, gen)`` -> (B, C, K, F): for each row, K samples of each label of its task, drawn with
    replacement (duplicates are rare at K = 5 of ~100 samples; a per-row randperm would cost a Python loop).
    """

    def __init__(self, tasks: Sequence[Task]):
        per = [t.by_class() for t in tasks]
        c = len(per[0])
        n = max(len(xc) for p in per for xc in p)
        self.x = torch.zeros(len(tasks), c, n, tasks[0].x_fit.shape[1])
        self.counts = torch.zeros(len(tasks), c)
        for i, p in enumerate(per):
            for j, xc in enumerate(p):
                self.x[i, j, :len(xc)] = xc
                self.counts[i, j] = len(xc)

    def draw(self, task_ids: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
        b, c = len(task_ids), self.x.shape[1]
        idx = (torch.rand(b, c, k, generator=gen) * self.counts[task_ids].unsqueeze(2)).long()
        return self.x[task_ids.view(b, 1, 1), torch.arange(c).view(1, c, 1), idx]


def task_from_spec(spec: str) -> Task:
    """``NAME:c1,c2,...`` (a class subset of a zoo dataset) or a .safetensors file holding ``x`` (N, F) float
    features, preprocessed like the generator's dataset, and ``y`` (N,) labels 0..C-1 (fit/val divided here;
    the file's val part is also its test part)."""
    from ..zoo.tabular import DATASETS

    path = Path(spec)
    if spec.endswith(".safetensors") or path.is_file():
        return _task_from_file(path)
    name, sep, cls = spec.partition(":")
    if not sep or name not in DATASETS:
        raise ConfigError(f"--dataset {spec!r}: expected NAME:c1,c2,... with NAME one of {', '.join(DATASETS)} "
                          "(e.g. digits:0,2,4,6,8), or a .safetensors file with tensors x and y")
    try:
        classes = [int(c) for c in cls.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--dataset {spec!r}: classes must be integers separated by commas") from None
    return make_task(name, classes)


def _task_from_file(path: Path) -> Task:
    from ..errors import CheckpointError
    from ..io.reader import open_checkpoint

    if not path.is_file():
        raise ConfigError(f"dataset file {path} does not exist")
    with open_checkpoint(path) as ck:
        for n in ("x", "y"):
            if n not in ck:
                raise CheckpointError("a dataset file needs tensors 'x' (N, F) and 'y' (N,)", path, n)
        x, y = ck.get("x").float().clone(), ck.get("y").clone()
    if x.dim() != 2 or y.dim() != 1 or len(x) != len(y) or y.is_floating_point():
        raise CheckpointError(f"x must be (N, F) and y (N,) integer labels; got {tuple(x.shape)}, "
                              f"{tuple(y.shape)} {y.dtype}", path, "y")
    if not torch.isfinite(x).all():
        raise CheckpointError("x holds NaN or Inf", path, "x")
    y = y.long()
    c = int(y.max()) + 1
    if y.min() < 0 or any(int((y == j).sum()) < 2 for j in range(c)):
        raise CheckpointError(f"labels must be 0..{c - 1}, each with at least 2 samples", path, "y")
    g = torch.Generator().manual_seed(1234)
    val = torch.zeros(len(y), dtype=torch.bool)
    for j in range(c):
        idx = (y == j).nonzero().flatten()
        val[idx[torch.randperm(len(idx), generator=g)[:max(1, round(0.2 * len(idx)))]]] = True
    return Task(path.name, tuple(range(c)), x[~val], y[~val], x[val], y[val], x[val], y[val])
