"""weightlab commands that train pruned or sparse zoo classifiers:

    weightlab spdf --dataset mnist1d --sparsity 0.75 -o MODEL         # sparse pre-training, dense fine-tuning
    weightlab scratch zoo:digits-cnn-seed0 --structure channels -o MODEL [--budget B] [--compare]

Both write a zoo classifier folder (model.safetensors + config.json) that weightlab align / prune / elastic read.
"""
from __future__ import annotations

import typer

from ..registry import REGISTRY
from . import app
from ._common import check_outputs, console, emit_json, force_option, json_option


def _classes(text: str | None, what: str) -> list[int] | None:
    from ..errors import ConfigError

    if text is None:
        return None
    try:
        vals = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated class ids, e.g. 0,1,2,3,4; got {text!r}") from None
    if not vals:
        raise ConfigError(f"{what} is empty")
    return vals


def _rows(data, classes, split: str):
    import torch

    from ..errors import ConfigError

    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    if classes is None:
        return x, y
    keep = torch.isin(y, torch.tensor(classes, dtype=y.dtype))
    if not keep.any():
        raise ConfigError(f"classes {classes} match no {split} rows of {data.name} (it has classes "
                          f"0-{data.num_classes - 1})")
    return x[keep], y[keep]


def _save(model, kind: str, dataset: str, out: str, prov, inputs, force: bool, summary: dict) -> None:
    import json

    from ..align.models import classifier_config
    from ..engine.source import StateDictSource
    from ..engine.streaming import write_source

    cfg = classifier_config(model, dataset, kind)
    files = {"config.json": json.dumps(cfg, indent=2) + "\n",
             "training_summary.json": json.dumps(summary, indent=2, default=float) + "\n"}
    src = StateDictSource({k: v.detach().contiguous() for k, v in model.state_dict().items()})
    write_source(src, out, provenance=prov, inputs=inputs, force=force, extra_files=files, show_progress=False)


@app.command("spdf")
def spdf_cmd(
        dataset: str = typer.Option("mnist1d", "--dataset", help="zoo dataset for pre-training: digits or mnist1d"),
        kind: str = typer.Option("mlp", "--kind", help="mlp or cnn (SmallCNN, digits only)"),
        hidden: str = typer.Option("256,256", "--hidden", help="MLP hidden widths"),
        sparsity: float = typer.Option(0.75, "--sparsity", "-s", help="share of each hidden weight matrix held at 0 "
                                                                     "during pre-training"),
        pretrain_epochs: int = typer.Option(20, "--pretrain-epochs"),
        finetune_epochs: int = typer.Option(10, "--finetune-epochs", help="dense epochs after the release (0: none)"),
        lr: float = typer.Option(3e-3, "--lr", help="pre-training AdamW lr"),
        finetune_lr: float = typer.Option(1e-3, "--finetune-lr"),
        pretrain_classes: str = typer.Option(None, "--pretrain-classes", help="pre-train on these classes only"),
        finetune_classes: str = typer.Option(None, "--finetune-classes", help="fine-tune (and test) on these only"),
        seed: int = typer.Option(0, "--seed", help="init, mask and batch order"),
        out: str = typer.Option(..., "--out", "-o", help="model folder to create"),
        force: bool = force_option(), json_out: str = json_option("the training summary")) -> None:
    """SPDF: train a fresh zoo classifier with a static random mask (sparse pre-training), release the mask and
    fine-tune it densely; report the pre-training FLOPs saved and the test accuracy."""
    from ..compress.spdf import spdf
    from ..errors import ConfigError
    from ..io.provenance import Provenance
    from ..zoo import accuracy, build_model, load_dataset

    if dataset not in ("digits", "mnist1d"):
        raise ConfigError(f"--dataset must be digits or mnist1d, got {dataset!r}")
    cfg = REGISTRY.get("compress", "spdf").make_config(dict(
        sparsity=sparsity, pretrain_epochs=pretrain_epochs, finetune_epochs=finetune_epochs, lr=lr,
        finetune_lr=finetune_lr, seed=seed))  # a ConfigError naming the bad option, before any work
    widths = _classes(hidden, "--hidden")
    check_outputs([out, json_out], [], force)
    data = load_dataset(dataset)
    pre = _rows(data, _classes(pretrain_classes, "--pretrain-classes"), "train")
    ft_cls = _classes(finetune_classes, "--finetune-classes")
    ft = _rows(data, ft_cls, "train")
    test = _rows(data, ft_cls, "test")
    model = build_model(kind, data, seed, tuple(widths))
    res = spdf(model, pre, ft if finetune_epochs > 0 else None, cfg)
    summary = {"dataset": dataset, "kind": kind, **res.as_dict(), "test_acc": accuracy(model, *test)}
    prov = Provenance(method="compress/spdf", params=cfg.model_dump(),
                      card={"details": {"dataset": dataset, "sparsity": sparsity,
                                        "test_acc": round(summary["test_acc"], 4)}})
    _save(model, kind, dataset, out, prov, [], force, summary)
    if emit_json(summary, json_out):
        return
    console.print(f"[green]SPDF[/] {sparsity:.0%} sparse pre-training ({res.flop_reduction:.2f}x fewer pre-training "
                  f"FLOPs than dense), {res.finetune_steps} dense fine-tuning steps; test acc "
                  f"{summary['test_acc']:.3f}; wrote {out}", highlight=False)


@app.command("scratch")
def scratch_cmd(
        model_ref: str = typer.Argument(..., help="a trained zoo classifier: folder or zoo:DATASET-KIND-seedN"),
        structure: str = typer.Option("channels", "--structure", help="channels (L1-norm, a smaller network) or "
                                                                      "weights (global magnitude masks)"),
        ratio: float = typer.Option(0.5, "--ratio", help="share of channels or weights pruned"),
        budget: str = typer.Option("E", "--budget", help="E: the large model's epochs; B: its training FLOPs"),
        epochs: int = typer.Option(40, "--epochs", help="the large model's training epochs (E)"),
        lr: float = typer.Option(0.1, "--lr", help="SGD lr (momentum 0.9, wd 1e-4, x0.1 at 50%/75%)"),
        compare: bool = typer.Option(False, "--compare", help="also fine-tune the pruned model (E/4 and E epochs "
                                                              "at lr 1e-3) and report all accuracies"),
        seed: int = typer.Option(0, "--seed", help="fresh init and batch order"),
        out: str = typer.Option(..., "--out", "-o", help="model folder to create (the scratch-trained model)"),
        force: bool = force_option(), json_out: str = json_option("the summary")) -> None:
    """"Rethinking the value of network pruning": prune a trained zoo classifier, then train the pruned
    architecture from a fresh random init (Scratch-E or Scratch-B); --compare adds the fine-tuning baselines."""
    from ..align.models import load_model
    from ..compress.rethinking import finetune, prune_for, train_from_scratch
    from ..errors import ConfigError
    from ..io.provenance import Provenance
    from ..zoo import accuracy, load_dataset

    cfg = REGISTRY.get("compress", "scratch").make_config(dict(structure=structure, ratio=ratio, budget=budget,
                                                               epochs=epochs, lr=lr, seed=seed))
    check_outputs([out, json_out], [model_ref], force)
    loaded = load_model(model_ref)
    if loaded.kind != "classifier":
        raise ConfigError(f"weightlab scratch trains zoo classifiers (MLP, SmallCNN); {model_ref} is a "
                          f"{loaded.kind}")
    data = load_dataset(loaded.dataset)
    large = loaded.model
    kind = loaded.config.get("kind", "mlp")
    pruned, masks = prune_for(large, cfg)
    res = train_from_scratch(pruned, data, cfg, large=large, masks=masks)

    def acc(m):
        return accuracy(m, data.x_test, data.y_test)

    summary = {"model": model_ref, "dataset": loaded.dataset, **cfg.model_dump(), "large_acc": acc(large),
               "pruned_acc": acc(pruned), "scratch": {**res.as_dict(), "acc": acc(res.model)}}
    if compare:
        for name, ep in (("finetune_e4", None), ("finetune_e", epochs)):
            r = finetune(pruned, data, cfg, epochs=ep, masks=masks)
            summary[name] = {**r.as_dict(), "acc": acc(r.model)}
    prov = Provenance(method="compress/scratch", params=cfg.model_dump(), inputs=[model_ref],
                      card={"details": {"structure": structure, "ratio": ratio, "budget": res.budget,
                                        "test_acc": round(summary["scratch"]["acc"], 4)}})
    _save(res.model, kind, loaded.dataset, out, prov, [model_ref], force, summary)
    if emit_json(summary, json_out):
        return
    line = (f"[green]{res.budget}[/] {structure} pruned {ratio:.0%}, trained from scratch {res.epochs} epochs: "
            f"test acc {summary['scratch']['acc']:.3f} (large {summary['large_acc']:.3f}, pruned "
            f"{summary['pruned_acc']:.3f}")
    if compare:
        line += (f", fine-tuned {summary['finetune_e4']['epochs']} ep {summary['finetune_e4']['acc']:.3f}, "
                 f"{epochs} ep {summary['finetune_e']['acc']:.3f}")
    console.print(line + f"); wrote {out}", highlight=False)
