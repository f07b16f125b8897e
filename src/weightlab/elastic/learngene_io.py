"""Learngene and descendant folders: model.safetensors + config.json + README.md, written atomically.

- A learngene folder (``model_type: weightlab-learngene``) holds the Aux-Net's state dict: the S stage
  blocks (``blocks.0..S-1``), patch/position embedding, final norm and head, with the stage lengths.
- A descendant (or teacher) folder (``model_type: weightlab-vit``) is an ordinary checkpoint: one tensor
  per weight (``blocks.0..D-1``), readable by every tensor-level family (inspect, merge, prune); config.json
  says how to rebuild the TinyViT, and, for a descendant, the learngene stage each layer came from.
Loading is strict: a missing, extra or misshapen tensor is a CheckpointError naming the file and tensor.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..io.provenance import Provenance
from ..io.writer import CheckpointWriter
from .learngene_model import TinyViT, ViTShape

LEARNGENE_TYPE = "weightlab-learngene"
VIT_TYPE = "weightlab-vit"


def _write(model: TinyViT, out, config: dict, provenance: Provenance | None, force: bool, inputs=()) -> Path:
    with CheckpointWriter(out, provenance=provenance or Provenance(), force=force, inputs=list(inputs)) as w:
        for name, t in model.state_dict().items():
            w.add(name, t)
        w.add_file("config.json", json.dumps(config, indent=2) + "\n")
    return w.out


def save_learngene(aux: TinyViT, out, *, extra: dict | None = None, provenance: Provenance | None = None,
                   force: bool = False) -> Path:
    if aux.stages is None:
        raise CheckpointError("only an Aux-Net with stages is a learngene", out)
    cfg = {"architectures": ["WeightlabLearngene"], "model_type": LEARNGENE_TYPE, **aux.config(),
           "torch_dtype": "float32", **(extra or {})}
    return _write(aux, out, cfg, provenance, force)


def save_vit(model: TinyViT, out, *, extra: dict | None = None, provenance: Provenance | None = None,
             force: bool = False, inputs=()) -> Path:
    cfg = {"architectures": ["WeightlabTinyViT"], "model_type": VIT_TYPE, **model.config(),
           "torch_dtype": "float32", **(extra or {})}
    if getattr(model, "learngene_mapping", None) is not None:
        cfg["learngene_mapping"] = list(model.learngene_mapping)
    return _write(model, out, cfg, provenance, force, inputs)


def _read(path, model_type: str, what: str) -> tuple[dict, dict, Path]:
    from ..io.reader import open_checkpoint

    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{what} does not exist", p)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise CheckpointError(f"not a {what} folder (no config.json); write one with weightlab elastic train "
                              "learngene / weightlab elastic expand", p)
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"config.json is not readable JSON ({e})", p / "config.json") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != model_type:
        got = cfg.get("model_type") if isinstance(cfg, dict) else None
        raise CheckpointError(f"config.json has model_type {got!r}, expected {model_type!r} ({what})", p)
    return cfg, open_checkpoint(p).state_dict(), p


def _rebuild(cfg: dict, sd: dict, p: Path, stages) -> TinyViT:
    try:
        shape = ViTShape(tuple(int(s) for s in cfg["input_shape"]), int(cfg["patch"]), int(cfg["dim"]),
                         int(cfg["heads"]), float(cfg["mlp_ratio"]), int(cfg["num_classes"]))
        model = TinyViT(shape, int(cfg["depth"]), stages)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"config.json does not describe a TinyViT ({type(e).__name__}: {e})", p) from None
    expected = model.state_dict()
    for name, t in expected.items():
        if name not in sd:
            raise CheckpointError("tensor missing from the checkpoint", p, name)
        if tuple(sd[name].shape) != tuple(t.shape):
            raise CheckpointError(f"shape {tuple(sd[name].shape)}, expected {tuple(t.shape)} from config.json", p, name)
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise CheckpointError("tensor not part of the model config.json describes", p, extra[0])
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.eval()


def load_learngene(path) -> TinyViT:
    """The Aux-Net (stage-shared TinyViT) stored in a learngene folder."""
    cfg, sd, p = _read(path, LEARNGENE_TYPE, "learngene")
    stages = cfg.get("stages")
    if not isinstance(stages, list) or not stages:
        raise CheckpointError("config.json has no stage lengths ('stages')", p)
    model = _rebuild(cfg, sd, p, [int(n) for n in stages])
    model.learngene_info = {k: cfg[k] for k in ("dataset", "teacher_test_acc", "aux_test_acc") if k in cfg}
    return model


def load_vit(path) -> TinyViT:
    """A teacher or descendant folder written by save_vit, as a TinyViT in eval mode."""
    cfg, sd, p = _read(path, VIT_TYPE, "TinyViT model")
    model = _rebuild(cfg, sd, p, None)
    if cfg.get("learngene_mapping") is not None:
        model.learngene_mapping = list(cfg["learngene_mapping"])
    return model


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
