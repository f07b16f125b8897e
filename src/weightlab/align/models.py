"""Model references for the align/connect commands, and how aligned models are saved.

A reference is one of:
- ``zoo:DATASET-KIND-seedN``: a zoo classifier trained with seed N (cached), e.g.
  ``zoo:digits-mlp-seed0``, ``zoo:digits-cnn-seed1``, ``zoo:mnist1d-mlp-seed2``;
- ``zoo:digits-KIND-base`` / ``zoo:digits-KIND-ftI``: the zoo's shared-init base and its
  fine-tunes on class subsets (zoo.digits_finetunes), for task-vector merges such as aTLAS;
- a folder written by ``weightlab align`` (or ``weightlab zoo export``): its config.json says
  which zoo architecture to rebuild (``weightlab-zoo-classifier`` / ``weightlab-zoo-mlp``);
- a Hugging Face folder: Llama-family decoders load as causal LMs, BERT as an encoder.
Weights alone do not say how to run a network, so a bare .safetensors/.pt file is refused.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError

_ZOO = re.compile(r"^zoo:(?P<dataset>[a-z0-9_]+)-(?P<kind>mlp|cnn)-seed(?P<seed>\d+)$")
_ZOO_FT = re.compile(r"^zoo:digits-(?P<kind>mlp|cnn)-(?P<role>base|ft(?P<i>\d+))$")
ZOO_CONFIG = "weightlab-zoo-classifier"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    kind: str  # "classifier", "causal-lm" or "encoder"
    ref: str
    dataset: str | None = None
    config: dict = field(default_factory=dict)  # what to write as config.json for a classifier
    path: Path | None = None  # HF folder (template for tokenizer/config files)
    tokenizer: object = None
    names: list[str] | None = None  # tensors stored in the HF folder


def classifier_config(model, dataset: str, kind: str) -> dict:
    from ..zoo import load_dataset

    data = load_dataset(dataset)
    cfg = {"architectures": ["WeightlabZooClassifier"], "model_type": ZOO_CONFIG, "kind": kind, "dataset": dataset,
           "num_features": data.num_features, "num_classes": data.num_classes}
    if kind == "mlp":
        cfg["hidden"] = [m.out_features for m in model.body if isinstance(m, torch.nn.Linear)][:-1]
    else:  # merged CNNs (PLeaS) change widths and fold BatchNorm into the convs
        cfg["channels"] = [m.out_channels for m in model.features if isinstance(m, torch.nn.Conv2d)]
        cfg["batchnorm_folded"] = not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.features)
    return cfg


def load_model(ref: str) -> LoadedModel:
    m = _ZOO.match(ref)
    if m:
        from ..zoo import trained_classifier

        model = trained_classifier(m["dataset"], m["kind"], int(m["seed"]))
        return LoadedModel(model, "classifier", ref, m["dataset"], classifier_config(model, m["dataset"], m["kind"]))
    m = _ZOO_FT.match(ref)
    if m:
        from ..zoo import digits_finetunes
        from ..zoo.classifiers import DEFAULT_SUBSETS

        i = int(m["i"]) if m["i"] is not None else None
        if i is not None and i >= len(DEFAULT_SUBSETS):
            raise ConfigError(f"the zoo has fine-tunes ft0..ft{len(DEFAULT_SUBSETS) - 1}, not ft{i}")
        base, fts = digits_finetunes(m["kind"])
        model = base if i is None else fts[i]
        return LoadedModel(model, "classifier", ref, "digits", classifier_config(model, "digits", m["kind"]))
    if ref.startswith("zoo:"):
        raise ConfigError(f"unknown zoo classifier '{ref}'; write zoo:DATASET-KIND-seedN, e.g. zoo:digits-mlp-seed0 "
                          f"(datasets: digits, mnist1d; kinds: mlp, cnn), or zoo:digits-mlp-base / "
                          f"zoo:digits-mlp-ft0 for the shared-init fine-tunes")
    p = Path(ref).expanduser()
    if not p.exists():
        raise ConfigError(f"model '{ref}' does not exist (give a folder or zoo:DATASET-KIND-seedN)")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise CheckpointError("alignment needs a runnable model: a folder with config.json (an HF model or one "
                              "written by weightlab align), or zoo:DATASET-KIND-seedN", p)
    cfg = json.loads((p / "config.json").read_text())
    mt = cfg.get("model_type")
    from ..io.reader import open_checkpoint

    if mt in (ZOO_CONFIG, "weightlab-zoo-mlp"):
        from ..zoo import MLP, SmallCNN, load_dataset

        ck = open_checkpoint(p)
        sd = ck.state_dict()
        dataset = cfg.get("dataset", "digits")
        data = load_dataset(dataset)
        kind = cfg.get("kind", "mlp")
        if kind == "cnn":
            model = SmallCNN(data.num_classes, tuple(cfg.get("channels") or (16, 32)))
            if cfg.get("batchnorm_folded"):
                from .pleas import fold_batchnorm

                model = fold_batchnorm(model)
        else:
            hidden = cfg.get("hidden") or [sd[k].shape[0] for k in sd if k.endswith("weight")][:-1]
            model = MLP(data.num_features, tuple(hidden), data.num_classes)
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise CheckpointError(f"weights do not fit the {kind} its config.json describes: "
                                  f"{str(e).splitlines()[0]}", p) from None
        return LoadedModel(model.eval(), "classifier", ref, dataset, classifier_config(model, dataset, kind))
    from ..io.hf import load_causal_lm, load_encoder

    names = open_checkpoint(p).names()
    if str((cfg.get("architectures") or [""])[0]).endswith("ForCausalLM"):
        model, tok = load_causal_lm(p)
        return LoadedModel(model, "causal-lm", ref, path=p, tokenizer=tok, names=names)
    model, tok = load_encoder(p)
    return LoadedModel(model, "encoder", ref, path=p, tokenizer=tok, names=names)


def save_aligned(loaded: LoadedModel, model: torch.nn.Module, out: str | Path, provenance, inputs,
                 extra_files: dict, force: bool = False) -> Path:
    from ..engine.source import StateDictSource
    from ..engine.streaming import write_source

    sd = model.state_dict()
    files = dict(extra_files)
    if loaded.kind == "classifier":
        files["config.json"] = json.dumps(loaded.config, indent=2) + "\n"
        src = StateDictSource({k: v.contiguous() for k, v in sd.items()})
    else:
        # save under the names the input folder used (HF modules may hold tied or renamed views)
        stored = loaded.names or list(sd)
        missing = [n for n in stored if n not in sd]
        if missing:
            raise CheckpointError(f"the loaded model has no tensor '{missing[0]}' to write back", loaded.path)
        src = StateDictSource({n: sd[n].contiguous() for n in stored}, None, loaded.path)
    return write_source(src, out, provenance=provenance, inputs=inputs, force=force, extra_files=files,
                        show_progress=False)
