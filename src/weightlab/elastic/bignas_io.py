"""BigNAS data splits and folders: supernets, and children written as ordinary checkpoints.

- Split: a zoo dataset's training set split once more (stratified, fixed seed) into train and a validation set
  for the search and model selection; the zoo's test set stays untouched for the reported accuracy.
- A supernet folder: config.json (model_type ``weightlab-bignas-supernet``: the arch, the dataset, the child
  whose BN statistics the buffers hold, the training config) and the supernet's tensors.
- A child folder holds only the child's own tensors (its parameter count is its own). MLP children are the zoo's
  MLP in the zoo classifier format (``weightlab-zoo-classifier``, kind mlp), which ``weightlab align`` and the
  other families load; CNN children are ``weightlab-bignas-cnn`` folders (a residual CNN the zoo lacks); LM
  children are ``weightlab-bignas-lm`` folders (config.json: the arch - vocab_size, context, d_model, head_dim, heads
  and mlp_hidden per block - and the vocabulary string; the zoo has no small transformer format).
- The "text" dataset: windows of the zoo's Wikipedia text in a fixed character vocabulary (bignas_lm.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from .bignas_nets import Child, ElasticNet, build_child, build_supernet

SUPERNET = "weightlab-bignas-supernet"
CHILD_CNN = "weightlab-bignas-cnn"
CHILD_LM = "weightlab-bignas-lm"
TEXT = "text"
ZOO_CLASSIFIER = "weightlab-zoo-classifier"  # the zoo classifier format (align/models.py reads it)
VAL_FRACTION, VAL_SEED = 0.1, 0


@dataclass
class Split:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


def load_split(name: str) -> Split:
    """A zoo dataset (digits, mnist1d, ...) with 10% of its training set held out for validation, or "text"."""
    if name == TEXT:
        from .bignas_lm import VOCAB_SIZE, text_arrays

        a = text_arrays()
        return Split(TEXT, a["x_train"], a["y_train"], a["x_val"], a["y_val"], a["x_test"], a["y_test"], VOCAB_SIZE)
    from ..zoo import load_dataset
    from ..zoo.tabular import stratified_split

    d = load_dataset(name)
    tr, va = stratified_split(d.y_train.numpy(), VAL_SEED, VAL_FRACTION)
    tr, va = torch.from_numpy(tr), torch.from_numpy(va)
    return Split(name, d.x_train[tr], d.y_train[tr], d.x_train[va], d.y_train[va], d.x_test, d.y_test,
                 d.num_classes)


def _provenance(method: str, params: dict, inputs=()):
    from ..io.provenance import Provenance

    return Provenance(method=method, params=params, inputs=[str(i) for i in inputs],
                      card={"tags": ["bignas", "elastic"], "library_name": "weightlab"})


def _write(tensors: dict, config: dict, out, provenance, inputs=(), force: bool = False) -> Path:
    from ..engine.source import StateDictSource
    from ..engine.streaming import write_source

    src = StateDictSource({k: v.detach().contiguous() for k, v in tensors.items()})
    return write_source(src, out, provenance=provenance, inputs=list(inputs), force=force,
                        extra_files={"config.json": json.dumps(config, indent=2) + "\n"}, show_progress=False)


def save_supernet(net: ElasticNet, dataset: str, out, *, train_config: dict | None = None,
                  force: bool = False) -> Path:
    if net.calibrated is None:
        raise ConfigError("calibrate the supernet's largest child before saving it (bignas.calibrate)")
    cfg = {"architectures": ["BigNASSupernet"], "model_type": SUPERNET, "dataset": dataset, "arch": net.arch(),
           "calibrated_child": net.calibrated.as_dict(), "max_child": net.max_child().as_dict(),
           "min_child": net.min_child().as_dict(), "train": train_config or {}}
    return _write(net.state_dict(), cfg, out, _provenance("elastic/bignas", train_config or {}), force=force)


def read_config(path) -> dict:
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"model '{path}' does not exist (give a folder written by weightlab elastic)")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise CheckpointError("expected a folder with config.json, written by weightlab elastic train/slice "
                              "(or a zoo classifier folder)", p)
    try:
        return json.loads((p / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"config.json is not valid JSON: {e}", p / "config.json") from None


def _state(path) -> dict:
    from ..io.reader import open_checkpoint

    with open_checkpoint(Path(path).expanduser()) as ck:
        return {k: v.clone() for k, v in ck.state_dict().items()}


def _load_into(model: torch.nn.Module, path, what: str) -> torch.nn.Module:
    try:
        model.load_state_dict(_state(path), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"the weights do not fit the {what} its config.json describes: "
                              f"{str(e).splitlines()[0]}", Path(path)) from None
    return model.eval()


def load_supernet(path) -> tuple[ElasticNet, dict]:
    cfg = read_config(path)
    if cfg.get("model_type") != SUPERNET:
        raise CheckpointError(f"not a BigNAS supernet (model_type {cfg.get('model_type')!r}); train one with "
                              "weightlab elastic train bignas", Path(path))
    net = _load_into(build_supernet(cfg["arch"]), path, "BigNAS supernet")
    net.calibrated = Child.from_dict(cfg["calibrated_child"])
    net.set_child(net.calibrated)
    return net, cfg


def save_child(net: ElasticNet, child: Child, dataset: str, out, *, inputs=(), force: bool = False,
               extra: dict | None = None) -> Path:
    """Write `child` (calibrated first by the caller if the net has BN) as a stand-alone checkpoint folder."""
    net.check_child(child)
    if getattr(net, "dims", None) and net.calibrated != child:
        raise ConfigError("calibrate the child's BN statistics before writing it (bignas.calibrate)")
    arch = net.child_arch(child)
    info = {"child": child.as_dict(), "supernet_arch": net.arch(), "parameters": net.child_params(child),
            **(extra or {})}
    if arch["net"] == "mlp":
        cfg = {"architectures": ["WeightlabZooClassifier"], "model_type": ZOO_CLASSIFIER, "kind": "mlp",
               "dataset": dataset, "num_features": arch["in_features"], "num_classes": arch["num_classes"],
               "hidden": arch["hidden"], "bignas": info}
    elif arch["net"] == "lm":
        from .bignas_lm import VOCAB

        cfg = {"architectures": ["BigNASLM"], "model_type": CHILD_LM, "dataset": dataset, "arch": arch,
               "num_hidden_layers": len(arch["heads"]), "hidden_size": arch["d_model"],
               "vocab_size": arch["vocab_size"], "max_position_embeddings": arch["context"], "vocab": VOCAB,
               "bignas": info}
    else:
        cfg = {"architectures": ["BigNASCNN"], "model_type": CHILD_CNN, "dataset": dataset, "arch": arch,
               "bignas": info}
    model = net.static_child(child)
    return _write(model.state_dict(), cfg, out, _provenance("elastic/bignas-slice", info, inputs), inputs, force)


def load_model(path) -> tuple[torch.nn.Module, dict]:
    """A runnable classifier from a folder: a supernet (its calibrated child), a BigNAS CNN child, or a zoo
    classifier folder (MLP, or SmallCNN with its BatchNorm). Returns (model in eval mode, config.json)."""
    cfg = read_config(path)
    mt = cfg.get("model_type")
    if mt == SUPERNET:
        return load_supernet(path)
    if mt == CHILD_CNN:
        return _load_into(build_child(cfg.get("arch") or {}), path, "BigNAS CNN child"), cfg
    if mt == CHILD_LM:
        from .bignas_lm import VOCAB

        if cfg.get("vocab", VOCAB) != VOCAB:
            raise CheckpointError("this LM child's vocabulary differs from weightlab's character vocabulary",
                                  Path(path) / "config.json")
        return _load_into(build_child(cfg.get("arch") or {}), path, "BigNAS LM child"), cfg
    if mt in (ZOO_CLASSIFIER, "weightlab-zoo-mlp"):
        from ..zoo import SmallCNN, load_dataset

        if cfg.get("kind", "mlp") == "cnn":
            if cfg.get("batchnorm_folded"):
                raise CheckpointError("a SmallCNN with folded BatchNorm (PLeaS output) is read by weightlab align, "
                                      "not by weightlab elastic", Path(path))
            data = load_dataset(cfg.get("dataset", "digits"))
            return _load_into(SmallCNN(data.num_classes, tuple(cfg.get("channels") or (16, 32))), path,
                              "zoo SmallCNN"), cfg
        if not cfg.get("hidden") or "num_features" not in cfg:
            data = load_dataset(cfg.get("dataset", "digits"))
            hidden = cfg.get("hidden") or [v.shape[0] for k, v in _state(path).items() if k.endswith("weight")][:-1]
            cfg = dict(cfg, hidden=hidden, num_features=data.num_features, num_classes=data.num_classes)
        arch = {"net": "mlp", "in_features": cfg["num_features"], "num_classes": cfg["num_classes"],
                "hidden": cfg["hidden"]}
        return _load_into(build_child(arch), path, "zoo MLP"), cfg
    raise CheckpointError(f"weightlab elastic reads BigNAS supernets and children and zoo classifier folders; "
                          f"this folder's model_type is {mt!r}", Path(path))
