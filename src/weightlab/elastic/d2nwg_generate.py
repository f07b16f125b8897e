"""D2NWG generation as a job: a generator folder + a dataset -> an ordinary MLP checkpoint folder.

The model is written with the zoo MLP's tensor names (``body.0.weight`` ...) and a config.json that says its
shape, so ``load_mlp`` (and any reader of safetensors) rebuilds it; every other family reads the folder as a
checkpoint. With ``samples > 1`` the sample with the best accuracy on the dataset's *validation* part is kept
(the reference picked the best of 50 on test accuracy, which is optimistic).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from .d2nwg import load_generator
from .d2nwg_zoo import Layout, accuracies, task_from_spec, unvectorize

MODEL_TYPE = "weightlab-zoo-mlp"


def write_model(vec: torch.Tensor, layout: Layout, out: str | os.PathLike, *, details: dict | None = None,
                inputs=(), force: bool = False, method: str = "elastic/d2nwg") -> Path:
    """One weight vector (P,) as a checkpoint folder (atomic) with config.json and provenance."""
    from ..io.provenance import Provenance
    from ..io.writer import CheckpointWriter

    cfg = {"architectures": ["WeightlabZooMLP"], "model_type": MODEL_TYPE, "in_features": layout.in_features,
           "hidden": list(layout.hidden), "num_classes": layout.num_classes, **(details or {})}
    prov = Provenance(method=method, params=details or {}, inputs=[str(i) for i in inputs],
                      card={"details": details or {}})
    with CheckpointWriter(out, provenance=prov, inputs=list(inputs), force=force) as w:
        for name, t in unvectorize(vec, layout).items():
            w.add(name, t.contiguous())
        w.add_file("config.json", json.dumps(cfg, indent=2) + "\n")
    return w.out


def load_mlp(path: str | os.PathLike) -> torch.nn.Module:
    """A folder written by ``write_model`` (or ``weightlab zoo export``-like MLPs with that config) as a zoo.MLP."""
    from ..io.reader import open_checkpoint
    from ..zoo import MLP

    p = Path(path)
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
        shape = int(cfg["in_features"]), tuple(int(h) for h in cfg["hidden"]), int(cfg["num_classes"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"not a weightlab MLP folder (config.json with in_features/hidden/num_classes): {e}",
                              p) from None
    model = MLP(*shape)
    with open_checkpoint(p) as ck:
        state = {n: ck.get(n).clone() for n in ck.names()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"tensors do not match config.json: {e}", p) from None
    return model.eval()


def generate_job(generator: str | os.PathLike, dataset: str, out: str | os.PathLike, *, seed: int = 0,
                 samples: int = 1, sampler: str = "ddpm", ddim_steps: int = 50, force: bool = False) -> dict:
    """Generate weights for ``dataset`` (``NAME:classes`` or a .safetensors file) and write them to ``out``."""
    from ..io.atomic import check_not_input

    if samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {samples}")
    if sampler not in ("ddpm", "ddim"):
        raise ConfigError(f"--sampler must be ddpm or ddim, got {sampler!r}")
    if ddim_steps < 1:
        raise ConfigError(f"--ddim-steps must be at least 1, got {ddim_steps}")
    out = Path(out)
    check_not_input(out, [Path(generator)] + ([Path(dataset)] if Path(dataset).is_file() else []))
    if out.exists() and not force:
        from ..errors import OutputExistsError

        raise OutputExistsError(f"'{out}' already exists; pass --force to replace it")
    gen = load_generator(generator)
    task = task_from_spec(dataset)
    gen.check_task(task)
    vecs = gen.generate(gen.condition(task, seed), n=samples, seed=seed, sampler=sampler, ddim_steps=ddim_steps)
    val = accuracies(vecs, [task] * samples, gen.layout, "val")
    best = int(val.argmax())  # first of the best on ties
    vec = vecs[best]
    test = float(accuracies(vec[None], [task], gen.layout, "test")[0])
    dist = (gen.zoo - vec).norm(dim=1)
    seen = task.dataset == gen.cfg.dataset and list(task.classes) in [list(c) for c in gen.info.get("train_tasks", [])]
    details = {"dataset": task.name, "classes": list(task.classes), "seed": seed, "samples": samples,
               "sampler": sampler, "chosen_sample": best, "val_accuracy": float(val[best]),
               "test_accuracy": test, "task_in_zoo": seen,
               "nearest_zoo_l2": float(dist.min()), "nearest_zoo_relative": float(dist.min() / vec.norm())}
    write_model(vec, gen.layout, out, details=details, force=force,
                inputs=[generator] + ([dataset] if Path(dataset).is_file() else []))
    return details
