"""weightlab elastic commands of learngene (registered on cli.elastic's apps):

    weightlab elastic train learngene --dataset digits|mnist1d --seed N -o LEARNGENE
    weightlab elastic expand LEARNGENE --depth D -o MODEL
"""
from __future__ import annotations

from pathlib import Path

import typer

from ._common import check_outputs, console, emit_json, force_option, json_option
from .elastic import elastic_app, train_app


def _ints(text: str | None, what: str) -> list[int] | None:
    from ..errors import ConfigError

    if text is None:
        return None
    try:
        vals = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, e.g. 2,2,2,2; got {text!r}") from None
    if not vals:
        raise ConfigError(f"{what} is empty")
    return vals


@train_app.command("learngene")
def train_learngene_cmd(
        dataset: str = typer.Option("digits", "--dataset", help="zoo dataset: digits (8x8 images) or mnist1d"),
        seed: int = typer.Option(0, "--seed", help="initialisation and batch order"),
        out: str = typer.Option(..., "--out", "-o", help="learngene folder to create"),
        stages: str = typer.Option("2,2,2,2", "--stages", help="Aux-Net layers per stage; one block per stage "
                                                             "is shared by its layers and stored"),
        epochs: int = typer.Option(20, "--epochs", help="Aux-Net distillation epochs"),
        teacher_epochs: int = typer.Option(30, "--teacher-epochs", help="ancestry-model epochs (unless --teacher)"),
        teacher: str = typer.Option(None, "--teacher", help="an ancestry model folder (weightlab-vit, e.g. from "
                                                            "--save-teacher) instead of training one"),
        save_teacher: str = typer.Option(None, "--save-teacher", help="also write the ancestry model to this folder"),
        force: bool = force_option(), json_out: str = json_option("the training summary")) -> None:
    """Train an ancestry model, then an Aux-Net with stage-wise weight sharing by distillation from it; write its
    stage blocks, embeddings, norm and head (the learngene)."""
    from ..elastic.learngene import LearngeneConfig, train_learngene
    from ..elastic.learngene_io import load_vit, save_learngene, save_vit
    from ..errors import ConfigError
    from ..io.provenance import Provenance
    from ..zoo.tabular import load_dataset

    if dataset not in ("digits", "mnist1d"):
        raise ConfigError(f"--dataset must be digits or mnist1d, got {dataset!r}")
    cfg = LearngeneConfig(stages=_ints(stages, "--stages"), epochs=epochs, teacher_epochs=teacher_epochs, seed=seed)
    if any(n < 1 for n in cfg.stages) or epochs < 1 or teacher_epochs < 1:
        raise ConfigError("--stages must be positive layer counts and --epochs/--teacher-epochs >= 1")
    check_outputs([out, save_teacher, json_out], [teacher] if teacher else [], force)
    if save_teacher and Path(save_teacher).resolve() == Path(out).resolve():
        raise ConfigError("--save-teacher and -o name the same folder")
    t_model = load_vit(teacher) if teacher else None
    data = load_dataset(dataset)
    res = train_learngene(data, cfg, teacher=t_model)
    summary = res.as_dict()
    prov = Provenance(method="elastic/learngene", params=cfg.model_dump(), inputs=[teacher] if teacher else [],
                      card={"details": {"dataset": dataset, "stages": cfg.stages,
                                        "aux_test_acc": round(res.aux_acc, 4)}})
    extra = {"dataset": dataset, "teacher_test_acc": res.teacher_acc, "aux_test_acc": res.aux_acc}
    save_learngene(res.aux, out, extra=extra, provenance=prov, force=force)
    if save_teacher:
        save_vit(res.teacher, save_teacher, extra={"dataset": dataset, "test_acc": res.teacher_acc},
                 provenance=Provenance(method="elastic/learngene-ancestry", params=cfg.model_dump()), force=force)
    if emit_json(summary, json_out):
        return
    console.print(f"[green]learngene[/] {len(cfg.stages)} stage blocks ({summary['learngene_params']:,} parameters "
                  f"vs the ancestry model's {summary['teacher_params']:,}); ancestry test acc "
                  f"{res.teacher_acc:.3f}, Aux-Net {res.aux_acc:.3f}; wrote {out}", highlight=False)


@elastic_app.command("expand")
def expand_cmd(
        learngene: str = typer.Argument(..., help="a learngene folder (weightlab elastic train learngene)"),
        depth: int = typer.Option(..., "--depth", help="layers of the descendant (>= the learngene's stages)"),
        out: str = typer.Option(..., "--out", "-o", help="descendant model folder to create"),
        allocation: str = typer.Option(None, "--allocation", help="layers per stage, e.g. 3,3,2,2 (sum = depth); "
                                                                  "default proportional to the Aux-Net's stages"),
        mapping: str = typer.Option(None, "--mapping", help="the stage each layer copies, e.g. 0,0,1,2,3,3 "
                                                            "(length = depth); overrides --allocation"),
        num_classes: int = typer.Option(None, "--num-classes", help="a new label space: a fresh head of this size"),
        new_head: bool = typer.Option(False, "--new-head", help="a freshly initialised head even for the same "
                                                                "label space"),
        seed: int = typer.Option(0, "--seed", help="initialisation of a fresh head"),
        force: bool = force_option(), json_out: str = json_option("the expansion summary")) -> None:
    """Expand a learngene into a descendant of any depth: each layer a copy of its stage's block (an ordinary
    checkpoint: model.safetensors + config.json)."""
    from ..elastic.learngene import descendant_params, expand, layer_mapping, learngene_params
    from ..elastic.learngene_io import load_learngene, save_vit
    from ..errors import ConfigError
    from ..io.provenance import Provenance

    if depth < 1:
        raise ConfigError(f"--depth must be >= 1, got {depth}")
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"--num-classes must be >= 1, got {num_classes}")
    check_outputs([out, json_out], [learngene], force)
    lg = load_learngene(learngene)
    alloc, mp = _ints(allocation, "--allocation"), _ints(mapping, "--mapping")
    m = layer_mapping(lg.stages, depth, alloc, mp)  # checked before anything is built or written
    child = expand(lg, depth, mapping=m, num_classes=num_classes, keep_head=not new_head, seed=seed)
    counts = [m.count(s) for s in range(len(lg.stages))]
    lg_params = learngene_params(lg.shape, len(lg.stages))
    summary = {"depth": depth, "allocation": counts, "mapping": m, "descendant_params":
               descendant_params(child.shape, depth), "learngene_params": lg_params,
               "head": "fresh" if new_head or child.shape.num_classes != lg.shape.num_classes else "learngene"}
    params = {"depth": depth, "allocation": alloc, "mapping": mp, "num_classes": num_classes, "new_head": new_head,
              "seed": seed}
    prov = Provenance(method="elastic/learngene-expand", params=params, inputs=[learngene],
                      card={"details": {"depth": depth, "allocation": counts}})
    extra = {"learngene_allocation": counts, **{k: v for k, v in getattr(lg, "learngene_info", {}).items()
                                                if k == "dataset"}}
    save_vit(child, out, extra=extra, provenance=prov, force=force, inputs=[learngene])
    if emit_json(summary, json_out):
        return
    console.print(f"[green]descendant[/] depth {depth}, layers per stage {counts} "
                  f"({summary['descendant_params']:,} parameters from a {lg_params:,}-parameter learngene, "
                  f"head: {summary['head']}); wrote {out}", highlight=False)
