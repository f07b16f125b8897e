"""weightlab elastic commands of bignas (registered on cli.elastic's apps): train bignas, slice, search, eval."""
from __future__ import annotations

import typer

from ._common import check_outputs, console, emit_json, force_option, json_option
from .elastic import elastic_app, train_app

_SUPERNET_HELP = "a supernet folder written by weightlab elastic train bignas"


def _child_line(child, params: int) -> str:
    d = child.as_dict()
    ks = f", kernels {d['kernels']}" if d["kernels"] else ""
    hs = f", heads {d['heads']}" if d.get("heads") else ""
    return f"widths {d['widths']}, depths {d['depths']}{ks}{hs}: {params:,} parameters"


_NET_OF = {"digits": "cnn", "mnist1d": "cnn", "text": "lm"}


@train_app.command("bignas")
def train_bignas_cmd(dataset: str = typer.Option(..., "--dataset", help="zoo dataset: digits, mnist1d or text "
                                                                       "(the zoo's Wikipedia text, char-level)"),
                     seed: int = typer.Option(0, "--seed", help="init, batch order and child sampling"),
                     out: str = typer.Option(..., "--out", "-o", help="supernet folder to create"),
                     net: str = typer.Option(None, "--net", help="cnn (residual, BN; 2-D for digits, 1-D for "
                                                                "mnist1d; their default), mlp (the zoo's MLP) or "
                                                                "lm (small transformer; text only, its default)"),
                     epochs: int = typer.Option(None, "--epochs", help="training epochs (CPU default 40; lm 12)"),
                     json_out: str = json_option("the training log"), force: bool = force_option()) -> None:
    """Train a BigNAS supernet: sandwich rule, in-place distillation, exp-decay LR with a 5% floor."""
    from ..elastic.bignas import BigNASConfig, train_bignas
    from ..elastic.bignas_io import load_split, save_supernet
    from ..errors import ConfigError

    if dataset not in _NET_OF:
        raise ConfigError(f"weightlab elastic train bignas takes --dataset digits, mnist1d or text, not {dataset!r}")
    net = net or _NET_OF[dataset]
    if (net == "lm") != (dataset == "text"):
        raise ConfigError(f"--net {net} does not fit --dataset {dataset}: the lm (transformer) trains on text, "
                          "mlp and cnn on digits or mnist1d")
    try:
        cfg = BigNASConfig(net=net, seed=seed, **({} if epochs is None else {"epochs": epochs}))
    except ValueError as e:
        raise ConfigError(f"bad BigNAS option: {e.errors()[0]['msg'] if hasattr(e, 'errors') else e}") from None
    check_outputs([out], [], force)
    split = load_split(dataset)
    res = train_bignas(split, cfg)
    save_supernet(res.net, dataset, out, train_config=cfg.model_dump(), force=force)
    if emit_json(res.as_dict(), json_out):
        return
    n = res.net
    console.print(f"[green]wrote[/] {out}: {net} supernet on {dataset}, {res.seconds:.0f} s; largest child "
                  f"{_child_line(n.max_child(), n.child_params(n.max_child()))}; smallest "
                  f"{_child_line(n.min_child(), n.child_params(n.min_child()))}")


def _open(supernet: str):
    from ..elastic.bignas_io import load_split, load_supernet

    net, cfg = load_supernet(supernet)
    return net, cfg, load_split(cfg["dataset"])


@elastic_app.command("slice")
def slice_cmd(supernet: str = typer.Argument(..., help=_SUPERNET_HELP),
              width: float = typer.Option(..., "--width", help="width multiplier of every layer: 0.25, 0.5, "
                                                              "0.75 or 1.0 (lm: MLP units and heads)"),
              depth: int = typer.Option(None, "--depth", help="hidden layers (mlp), blocks per stage (cnn) or "
                                                             "blocks (lm); default the largest"),
              heads: int = typer.Option(None, "--heads", help="attention heads of every block (lm); default "
                                                             "width x the largest"),
              kernel: int = typer.Option(None, "--kernel", help="kernel size of every stage (cnn); default the "
                                                               "largest"),
              out: str = typer.Option(..., "--out", "-o", help="child folder to create"),
              force: bool = force_option()) -> None:
    """Write one child as an ordinary checkpoint (its own tensors; BN recalibrated), no retraining."""
    from ..elastic.bignas import calibrate
    from ..elastic.bignas_io import save_child
    from ..errors import ConfigError

    check_outputs([out], [supernet], force)
    net, cfg, split = _open(supernet)
    if heads is not None and net.net != "lm":
        raise ConfigError(f"a {net.net} supernet has no attention heads; leave --heads out")
    child = (net.uniform_child(width, depth, kernel, heads) if heads is not None else
             net.uniform_child(width, depth, kernel))  # option errors before any compute
    calibrate(net, child, split.x_train, cfg.get("train", {}).get("calib_batches", 64))
    save_child(net, child, cfg["dataset"], out, inputs=[supernet], force=force,
               extra={"width": width, "depth": depth, "kernel": kernel, "heads": heads})
    console.print(f"[green]wrote[/] {out}: child {_child_line(child, net.child_params(child))}")


@elastic_app.command("search")
def search_cmd(supernet: str = typer.Argument(..., help=_SUPERNET_HELP),
               max_params: int = typer.Option(None, "--max-params", help="parameter budget of the child"),
               max_latency_ms: float = typer.Option(None, "--max-latency-ms",
                                                    help="latency budget: ms per forward of one input on this CPU"),
               fine_steps: int = typer.Option(30, "--fine-steps", help="mutations tried after the coarse grid"),
               seed: int = typer.Option(0, "--seed"),
               out: str = typer.Option(None, "--out", "-o", help="also write the best child to this folder"),
               json_out: str = json_option("the search result"), force: bool = force_option()) -> None:
    """Coarse-to-fine search for the child with the best validation accuracy under a budget."""
    from ..elastic.bignas import calibrate
    from ..elastic.bignas_io import save_child
    from ..elastic.bignas_search import accuracy_score, lm_score, search
    from ..errors import ConfigError

    if max_params is None and max_latency_ms is None:
        raise ConfigError("give a budget: --max-params N and/or --max-latency-ms X")
    if fine_steps < 0:
        raise ConfigError(f"--fine-steps must be >= 0, not {fine_steps}")
    check_outputs([out, json_out], [supernet], force)
    net, cfg, split = _open(supernet)
    cb = cfg.get("train", {}).get("calib_batches", 64)
    lm = net.net == "lm"
    res = search(net, lm_score(net, split) if lm else accuracy_score(net, split, cb), max_params=max_params,
                 max_latency_ms=max_latency_ms, fine_steps=fine_steps, seed=seed,
                 metric="bits_per_char" if lm else "accuracy")
    calibrate(net, res.child, split.x_train, cb)
    key = res.metric
    d = res.as_dict() | {"dataset": cfg["dataset"], "metric": "validation bits per character" if lm else
                         "validation accuracy (BN recalibrated)"}
    if out:
        save_child(net, res.child, cfg["dataset"], out, inputs=[supernet], force=force, extra={"search": {
            k: d[k] for k in (key, "budget")}})
    if emit_json(d, json_out):
        return
    console.print(f"best child under {res.budget}: {_child_line(res.child, res.params)}; validation "
                  f"{key.replace('_', ' ')} {d[key]:.4f} ({len(res.history)} children measured, {res.seconds:.1f} s)"
                  + (f"; wrote {out}" if out else ""))


@elastic_app.command("eval")
def eval_cmd(model: str = typer.Argument(..., help="a supernet folder (its largest child), a child folder, or "
                                                   "a zoo classifier folder"),
             dataset: str = typer.Option(..., "--dataset", help="zoo dataset whose test split is scored "
                                                                 "(text: bits/char and next-character accuracy)"),
             json_out: str = json_option("the accuracy")) -> None:
    """Test accuracy of a supernet's largest child or of a sliced child."""
    from ..elastic.bignas import evaluate
    from ..elastic.bignas_io import load_model, load_split
    from ..elastic.bignas_lm import BigNASLM, ElasticLM, evaluate_lm
    from ..errors import ConfigError

    m, cfg = load_model(model)
    trained_on = cfg.get("dataset")
    if trained_on and trained_on != dataset:
        raise ConfigError(f"'{model}' was trained on {trained_on}; it cannot be scored on {dataset}. "
                          f"Pass --dataset {trained_on}")
    lm = isinstance(m, (BigNASLM, ElasticLM))
    if lm != (dataset == "text"):
        raise ConfigError(f"'{model}' is a transformer: pass --dataset text" if lm else
                          f"'{model}' is a classifier; --dataset text scores BigNAS transformers (net lm) only")
    split = load_split(dataset)
    if lm:
        scores = evaluate_lm(m, split.x_test, split.y_test)  # accuracy: next-character accuracy
    else:
        scores = {"accuracy": evaluate(m, split.x_test, split.y_test)}
    acc = scores["accuracy"]
    params = sum(p.numel() for p in m.parameters())
    child = getattr(m, "calibrated", None)
    d = {**scores, "dataset": dataset, "split": "test", "samples": len(split.y_test),
         "parameters": params if child is None else m.child_params(child),
         "model_type": cfg.get("model_type"),
         "child": child.as_dict() if child is not None else (cfg.get("bignas") or {}).get("child")}
    if emit_json(d, json_out):
        return
    bpc = f"{d['bits_per_char']:.4f} bits/char, next-character " if "bits_per_char" in d else ""
    console.print(f"{model}: test {bpc}accuracy {acc:.4f} on {dataset} ({len(split.y_test)} samples), "
                  f"{d['parameters']:,} parameters")
