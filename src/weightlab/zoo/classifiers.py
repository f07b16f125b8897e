"""Small classifiers trained deterministically in about a second on CPU.

They are real trained networks for the methods that need several related models:
independently seeded models (permutation alignment, ensembles) and fine-tunes that share
one pretrained init (model soups, task arithmetic, TIES). Weights are cached as
safetensors under cache_dir()/classifiers/, keyed by every argument that shapes them,
so a second call is instant and returns bit-identical weights.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from weightlab.errors import ConfigError
from weightlab.zoo._cache import atomic_file, cache_dir, key_hash
from weightlab.zoo.tabular import Dataset, load_dataset

KINDS = ("mlp", "cnn")
DEFAULT_SUBSETS = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (0, 2, 4, 6, 8), (1, 3, 5, 7, 9))
# Per-kind training defaults: a few seconds at most on 2 CPU cores, test accuracy
# about 0.96-0.97 (MLP) and 0.98 (SmallCNN) on digits.
TRAINING = {"mlp": dict(epochs=20, lr=3e-3), "cnn": dict(epochs=10, lr=1e-2)}
_CACHE_VERSION = 1  # bump when training code changes, so stale weights are not reused


class MLP(nn.Module):
    """Linear/ReLU chain. `body` is a plain nn.Sequential so alignment code can walk it
    as a list of Linear layers with elementwise activations in between."""

    def __init__(self, in_features: int, hidden: Sequence[int] = (64, 64), num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))


class SmallCNN(nn.Module):
    """Conv+BN+ReLU, 2x2 max pool, Conv+BN+ReLU, average pool to 2x2, linear head.

    For 8x8 digits images: takes the 64 flat features and reshapes them, so it uses the
    same Dataset as MLP. It gives the methods conv weights and BatchNorm statistics to
    handle. (A global average pool instead of 2x2 lost the digit layout: about 0.9 test
    accuracy and unstable across seeds, against about 0.98 here.)
    """

    def __init__(self, num_classes: int = 10, channels: Sequence[int] = (16, 32), side: int = 8):
        super().__init__()
        self.side = side
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(c2 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, self.side, self.side)
        return self.head(self.pool(self.features(x)).flatten(1))


def build_model(kind: str, dataset: Dataset, seed: int, hidden: Sequence[int] = (64, 64)) -> nn.Module:
    """A freshly initialised model; the init depends only on `seed`.

    The global torch RNG is forked, so building a model does not disturb the caller's.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown classifier kind {kind!r}; valid: {', '.join(KINDS)}")
    if kind == "cnn" and dataset.num_features != 64:
        raise ConfigError(f"SmallCNN expects 8x8 images (64 features); {dataset.name} has "
                          f"{dataset.num_features}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "mlp":
            return MLP(dataset.num_features, tuple(hidden), dataset.num_classes)
        return SmallCNN(dataset.num_classes)


def train_classifier(model: nn.Module, dataset: Dataset, epochs: int = 20, lr: float = 1e-2,
                     seed: int = 0, class_subset: Sequence[int] | None = None,
                     batch_size: int = 64, weight_decay: float = 0.0) -> nn.Module:
    """Train `model` in place with Adam and return it in eval mode.

    The batch order comes from a private generator seeded with `seed`, so the same
    model, data and seed give bit-identical weights. `class_subset` keeps only training
    samples of those classes (the output layer keeps all classes).
    """
    x, y = dataset.x_train, dataset.y_train
    if class_subset is not None:
        keep = torch.isin(y, torch.tensor(list(class_subset), dtype=y.dtype))
        if not keep.any():
            raise ConfigError(f"class_subset {tuple(class_subset)} matches no training samples")
        x, y = x[keep], y[keep]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    # One thread: these matmuls are too small to gain from more, they slow down badly
    # when the cores are busy, and the result then cannot depend on the core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=gen)
            for start in range(0, len(y), batch_size):
                idx = order[start:start + batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows of `x` whose argmax logit equals `y` (model run in eval mode)."""
    was_training = model.training
    model.eval()
    try:
        return (model(x).argmax(dim=1) == y).float().mean().item()
    finally:
        model.train(was_training)


def _cached(key: dict, model: nn.Module, train) -> nn.Module:
    """Load `model`'s weights from the cache entry for `key`, or train and store them."""
    path = cache_dir() / "classifiers" / f"{key['dataset']}-{key['kind']}-{key_hash(**key)}.safetensors"
    if path.is_file():
        try:
            state = load_file(path)
        except (OSError, SafetensorError):
            state = None  # damaged: retrain and overwrite
        # Check the layout before loading, so a mismatch never leaves a half-loaded model.
        expected = model.state_dict()
        if state is not None and state.keys() == expected.keys() and all(
                state[k].shape == v.shape and state[k].dtype == v.dtype for k, v in expected.items()):
            model.load_state_dict(state, strict=True)
            return model.eval()
    train(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata={"weightlab.zoo": json.dumps(key, sort_keys=True)})
    return model.eval()


def _defaults(kind: str, epochs: int | None, lr: float | None) -> tuple[int, float]:
    if kind not in KINDS:
        raise ConfigError(f"unknown classifier kind {kind!r}; valid: {', '.join(KINDS)}")
    d = TRAINING[kind]
    return (d["epochs"] if epochs is None else int(epochs)), (d["lr"] if lr is None else float(lr))


def trained_classifier(dataset: str = "digits", kind: str = "mlp", seed: int = 0,
                       epochs: int | None = None, lr: float | None = None, batch_size: int = 64,
                       hidden: Sequence[int] = (64, 64), data_seed: int | None = None) -> nn.Module:
    """One model initialised and trained with `seed` on a zoo dataset (cached).

    epochs/lr default per kind (see TRAINING); data_seed=None is the dataset's default split.
    """
    epochs, lr = _defaults(kind, epochs, lr)
    data = load_dataset(dataset, seed=data_seed)
    key = dict(v=_CACHE_VERSION, dataset=dataset, data_seed=data_seed, kind=kind, seed=seed,
               epochs=epochs, lr=lr, batch_size=batch_size,
               hidden=list(hidden) if kind == "mlp" else None)
    model = build_model(kind, data, seed, hidden)
    return _cached(key, model, lambda m: train_classifier(m, data, epochs, lr, seed, None, batch_size))


def digits_classifiers(kind: str = "mlp", seeds: Sequence[int] = (0, 1, 2),
                       epochs: int | None = None, lr: float | None = None) -> list[nn.Module]:
    """Independently initialised and trained digits models, one per seed.

    All use the same data split (digits(seed=0)), so their test accuracies compare.
    """
    return [trained_classifier("digits", kind, s, epochs=epochs, lr=lr) for s in seeds]


def digits_finetunes(kind: str = "mlp", subsets: Sequence[Sequence[int]] = DEFAULT_SUBSETS,
                     base_epochs: int = 2, ft_epochs: int = 5, seed: int = 0,
                     lr: float = 1e-2, ft_lr: float = 1e-3) -> tuple[nn.Module, list[nn.Module]]:
    """(base, fine-tunes): one shared init trained briefly on all classes, then copied
    and fine-tuned separately on each class subset.

    Every fine-tune starts from the same base weights, which is what model soups,
    task arithmetic and TIES assume; task vectors are `finetune - base`.
    """
    data = load_dataset("digits")
    base_key = dict(v=_CACHE_VERSION, dataset="digits", kind=kind, seed=seed, role="base",
                    epochs=base_epochs, lr=lr)
    base = _cached(base_key, build_model(kind, data, seed),
                   lambda m: train_classifier(m, data, base_epochs, lr, seed))
    finetunes = []
    for subset in subsets:
        subset = tuple(int(c) for c in subset)
        key = dict(base_key, role="finetune", subset=list(subset), ft_epochs=ft_epochs, ft_lr=ft_lr)
        # Each fine-tune's batch order also depends on its subset, not only on `seed`.
        ft_seed = seed * 1000 + sum(1 << c for c in subset)
        finetunes.append(_cached(key, copy.deepcopy(base), lambda m: train_classifier(
            m, data, ft_epochs, ft_lr, ft_seed, class_subset=subset)))
    return base, finetunes
