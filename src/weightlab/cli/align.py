from __future__ import annotations

import json
from pathlib import Path

import typer

from . import app
from ._common import console, emit_json, json_option

_REF_HELP = "zoo:DATASET-KIND-seedN (e.g. zoo:digits-mlp-seed0), a folder written by weightlab align, or an HF folder"
_CLS_HELP = "zoo:DATASET-KIND-seedN, zoo:digits-KIND-base/ftI, or a classifier folder written by weightlab"


def _spec(spec: str):
    return "auto" if spec == "auto" else spec


_DEVICE_HELP = ("where the float64 costs, forwards and fits run: auto (first accelerator, else cpu; mps has no "
                "float64, so auto means cpu there), cpu, cuda, cuda:N. The assignment solver (scipy) always "
                "runs on the CPU")


def _device_opt():
    return typer.Option("auto", "--device", help=_DEVICE_HELP)


def _check_device(device: str) -> None:
    """Resolve before loading anything: an unavailable device is one error line before any work."""
    from ..engine.placement import float64_device

    float64_device(device)


@app.command()
def align(a: str = typer.Argument(..., help=f"reference model A: {_REF_HELP}"),
          b: str = typer.Argument(..., help="model B, same architecture; it is permuted into A's basis"),
          spec: str = typer.Option("auto", "--spec", help="auto, or a JSON/YAML permutation spec file"),
          seed: int = typer.Option(0, "--seed", help="order in which permutations are visited"),
          out: str = typer.Option(..., "--out", "-o", help="folder to create (B permuted; loads like B)"),
          force: bool = typer.Option(False, "--force"), device: str = _device_opt()) -> None:
    """Weight matching: write B with its hidden units permuted to line up with A's (same function as B)."""
    from ..align import WeightMatchingConfig, match_state_dicts, permuted_copy, resolve_spec
    from ..align.models import load_model, save_aligned
    from ..errors import ConfigError, OutputExistsError
    from ..io.provenance import Provenance

    _check_device(device)
    if Path(out).exists() and not force:
        raise OutputExistsError(f"output '{out}' already exists; pass --force to replace it")
    la, lb = load_model(a), load_model(b)
    if type(la.model) is not type(lb.model):
        raise ConfigError(f"A is a {type(la.model).__name__} but B is a {type(lb.model).__name__}")
    s = resolve_spec(la.model, _spec(spec))
    buffers = {k for k, _ in la.model.named_buffers()}
    res = match_state_dicts(s, la.model.state_dict(), lb.model.state_dict(), WeightMatchingConfig(seed=seed),
                            skip=buffers, device=device)
    aligned = permuted_copy(lb.model, s, res.perms)
    report = {"sweeps": res.sweeps, "objective_start": res.objective_start, "objective": res.objective,
              "seconds": round(res.seconds, 3), "groups": {p: n for p, n in s.sizes.items()}, "notes": s.notes}
    files = {"permutations.json": json.dumps({p: v.tolist() for p, v in res.perms.items()}) + "\n",
             "align-report.json": json.dumps(report, indent=1) + "\n"}
    prov = Provenance(method="align/weight-matching", params={"spec": spec, "seed": seed, **report},
                      inputs=[a, b])
    ins = [p for p in (la.path, lb.path) if p is not None]
    save_aligned(lb, aligned, out, prov, ins, files, force=force)
    console.print(f"[green]aligned[/] {len(s.sizes)} permutation groups in {res.sweeps} sweeps "
                  f"({res.seconds:.2f} s); <A, pi(B)> {res.objective_start:.4g} -> {res.objective:.4g}; wrote {out}")
    for n in s.notes:
        console.print(f"note: {n}")


@app.command()
def connect(a: str = typer.Argument(..., help=f"model A: {_REF_HELP}"),
            b: str = typer.Argument(..., help="model B, same architecture"),
            data: str = typer.Option(None, "--data", help="classifiers: a zoo dataset (default: the models' own); "
                                                          "causal LMs: wiki or a text file"),
            points: int = typer.Option(25, "--points", help="models on the path, ends included"),
            no_align: bool = typer.Option(False, "--no-align", help="only the path between A and B as given"),
            spec: str = typer.Option("auto", "--spec", help="auto, or a JSON/YAML permutation spec file"),
            report: str = typer.Option(None, "--report", help="write a self-contained HTML report here"),
            plot: str = typer.Option(None, "--plot", help="write the loss/accuracy plot (PNG) here"),
            max_tokens: int = typer.Option(4096, "--max-tokens", help="causal LMs: tokens of text evaluated"),
            json_out: str = json_option(),
            device: str = _device_opt()) -> None:
    """Linear mode connectivity: loss and accuracy along A -> B before and after weight matching, the barrier
    (reference: max L - (L(A)+L(B))/2; linear: height above the chord) and the singular-vector analysis."""
    from ..align import ConnectivityConfig, connectivity
    from ..align.models import load_model
    from ..align.report import plot_paths, write_report
    from ..engine.evaluators import CausalLMEvaluator, ClassificationEvaluator
    from ..errors import ConfigError

    _check_device(device)
    la, lb = load_model(a), load_model(b)
    bn_data = None
    if la.kind == "classifier":
        from ..zoo import load_dataset

        ds = load_dataset(data or la.dataset)
        evaluator = ClassificationEvaluator(ds.x_test, ds.y_test)
        bn_data = ds.x_train
    elif la.kind == "causal-lm":
        from ..io.refs import load_text

        evaluator = CausalLMEvaluator(la.tokenizer, load_text(data or "wiki", "heldout"), seqlen=256,
                                      max_tokens=max_tokens)
    else:
        raise ConfigError("connect needs a loss: it works on zoo classifiers and causal LMs; "
                          "for an encoder use weightlab align and your own evaluation")
    res = connectivity(la.model, lb.model, evaluator, _spec(spec),
                       ConnectivityConfig(points=points, align=not no_align), bn_data=bn_data, device=device)
    summary = res.summary()
    if plot:
        from ..io.atomic import write_file_atomic

        write_file_atomic(Path(plot), plot_paths(res, f"{a} -> {b}"))
    if report:
        write_report(res, report, f"Linear mode connectivity: {a} -> {b}",
                     {"a": a, "b": b, "data": data or la.dataset or "wiki", "points": points})
    if emit_json({**summary, "before_path": res.before.as_dict(),
                  "after_path": res.after.as_dict() if res.after else None}, json_out):
        return
    for tag in ("before", "after"):
        if tag not in summary:
            continue
        s = summary[tag]
        bars = ", ".join(f"{m} {v['reference']:.4f} (linear {v['linear']:.4f})" for m, v in s["barrier"].items())
        mid = ", ".join(f"{k} {v:.4f}" for k, v in s["midpoint"].items())
        console.print(f"[bold]{'after weight matching' if tag == 'after' else 'as given'}[/] barrier: {bars}; midpoint: {mid}")
    if res.analysis:
        an = res.analysis
        console.print(f"distance ratio {an['distance_ratio']:.3f}; singular values kept (max change "
                      f"{an['max_sv_change']:.1e}); sigma-weighted vector alignment {an['aligned_before']:.3f} -> "
                      f"{an['aligned_after']:.3f}; top-{an['k']} overlap {an['overlap_before']:.3f} -> "
                      f"{an['overlap_after']:.3f}")
    for f in (plot, report):
        if f:
            console.print(f"wrote {f}")


def _classifiers(refs: list[str], what: str):
    from ..align.models import load_model
    from ..errors import ConfigError

    loaded = [load_model(r) for r in refs]
    for lm in loaded:
        if lm.kind != "classifier":
            raise ConfigError(f"{what} on the command line works on zoo classifiers and folders written by weightlab "
                              f"(got a {lm.kind} at '{lm.ref}'); call weightlab.align.{what}() from Python for "
                              f"other models")
        if type(lm.model) is not type(loaded[0].model) or lm.dataset != loaded[0].dataset:
            raise ConfigError(f"'{lm.ref}' is a {type(lm.model).__name__} for {lm.dataset} but '{loaded[0].ref}' is "
                              f"a {type(loaded[0].model).__name__} for {loaded[0].dataset}: {what} needs one "
                              f"architecture and task")
    return loaded


def _inputs(name: str, loaded, samples: int):
    from ..errors import ConfigError
    from ..zoo import load_dataset

    ds = load_dataset(name)
    if ds.num_features != loaded.config["num_features"]:
        raise ConfigError(f"dataset '{name}' has {ds.num_features} input features but '{loaded.ref}' reads "
                          f"{loaded.config['num_features']}; pick data of the same input size")
    return ds.x_train[:samples], ds.y_train[:samples]


def _accuracy(model, dataset: str) -> float:
    from ..engine.evaluators import ClassificationEvaluator
    from ..zoo import load_dataset

    ds = load_dataset(dataset)
    return round(ClassificationEvaluator(ds.x_test, ds.y_test)(model)["accuracy"], 4)


def _refuse_existing(out: str, force: bool) -> None:
    from ..errors import OutputExistsError

    if Path(out).exists() and not force:
        raise OutputExistsError(f"output '{out}' already exists; pass --force to replace it")


@app.command("pleas")
def pleas_cmd(a: str = typer.Argument(..., help=f"model A: {_CLS_HELP}"),
              b: str = typer.Argument(..., help="model B, same architecture and task"),
              ratio: float = typer.Option(None, "--ratio", help="share of units per layer kept unmerged: 0 merges "
                                                                 "fully (one model's size), 1 keeps both (default 0)"),
              budget: float = typer.Option(None, "--budget", help="merged size in multiples of one model's "
                                                                   "parameters (e.g. 1.5); picks the ratio"),
              data: str = typer.Option(None, "--data", help="zoo dataset whose training inputs drive matching and "
                                                            "the refit (default: the models' own; another dataset of "
                                                            "the same input size is the data-free variant)"),
              samples: int = typer.Option(2000, "--samples", help="inputs used, from the start of the training split"),
              matching: str = typer.Option("activation", "--matching", help="activation or weight"),
              out: str = typer.Option(..., "--out", "-o", help="folder to create (the merged model; loads like A)"),
              force: bool = typer.Option(False, "--force"),
              json_out: str = json_option("the report"),
              device: str = _device_opt()) -> None:
    """PLeaS: match A's and B's units, merge each layer to n(1 + ratio) units, refit every layer by least squares."""
    import dataclasses

    from ..align.models import classifier_config, save_aligned
    from ..align.pleas import pleas, ratio_for_budget
    from ..errors import ConfigError
    from ..io.provenance import Provenance
    from ..registry import get_method

    if ratio is not None and budget is not None:
        raise ConfigError("give --ratio or --budget, not both")
    _check_device(device)
    _refuse_existing(out, force)
    la, lb = _classifiers([a, b], "pleas")
    x, _ = _inputs(data or la.dataset, la, samples)
    r = ratio_for_budget(la.model, budget) if budget is not None else (ratio or 0.0)
    cfg = get_method("merge", "pleas").make_config({"ratio": r, "matching": matching})
    res = pleas(la.model, lb.model, x, cfg, device=device)
    one = sum(p.numel() for p in la.model.parameters())
    report = {"ratio": r, "widths": res.widths, "params": res.params, "params_one_model": one,
              "size": round(res.params / one, 4), "layer_error": res.layer_error, "seconds": round(res.seconds, 3),
              "data": data or la.dataset, "samples": len(x),
              "accuracy": {"a": _accuracy(la.model, la.dataset), "b": _accuracy(lb.model, la.dataset),
                           "merged": _accuracy(res.model, la.dataset)}}
    files = {"permutations.json": json.dumps({p: v.tolist() for p, v in res.perms.items()}) + "\n",
             "pleas-report.json": json.dumps(report, indent=1) + "\n"}
    merged = dataclasses.replace(la, config=classifier_config(res.model, la.dataset, la.config["kind"]))
    prov = Provenance(method="merge/pleas", params={"matching": matching, **report}, inputs=[a, b])
    save_aligned(merged, res.model, out, prov, [p for p in (la.path, lb.path) if p is not None], files, force=force)
    if emit_json(report, json_out):
        return
    acc = report["accuracy"]
    console.print(f"[green]merged[/] with ratio {r:.3f}: widths {res.widths}, {report['size']:.2f}x one model; test "
                  f"accuracy A {acc['a']:.4f}, B {acc['b']:.4f}, merged {acc['merged']:.4f}; wrote {out}")


@app.command("atlas")
def atlas_cmd(base: str = typer.Argument(..., help=f"pre-trained model theta_0: {_CLS_HELP}"),
              finetunes: list[str] = typer.Argument(..., help="fine-tunes of BASE (e.g. zoo:digits-mlp-ft0)"),
              data: str = typer.Option(None, "--data", help="zoo dataset to fit on (default: the base model's)"),
              samples: int = typer.Option(300, "--samples", help="examples from the start of the training split"),
              objective: str = typer.Option("supervised", "--objective", help="supervised (labels) or entropy "
                                                                              "(unlabelled)"),
              partitions: int = typer.Option(1, "--partitions", help="aTLAS x K: random groups per tensor"),
              per_model: bool = typer.Option(False, "--per-model",
                                             help="one coefficient per fine-tune, not per tensor"),
              lr: float = typer.Option(1e-3, "--lr"),
              epochs: int = typer.Option(20, "--epochs"),
              steps: int = typer.Option(None, "--steps", help="overrides --epochs"),
              seed: int = typer.Option(0, "--seed"),
              out: str = typer.Option(..., "--out", "-o",
                                      help="folder to create (the composed model; loads like BASE)"),
              force: bool = typer.Option(False, "--force"),
              json_out: str = json_option("the report"),
              device: str = _device_opt()) -> None:
    """aTLAS: theta_0 + sum of learned per-tensor coefficients x task vectors, fitted from zero on a small set."""
    import copy

    from ..align.atlas import atlas
    from ..align.models import save_aligned
    from ..engine.evaluators import ClassificationEvaluator
    from ..io.provenance import Provenance
    from ..registry import get_method

    _check_device(device)
    _refuse_existing(out, force)
    loaded = _classifiers([base, *finetunes], "atlas")
    lb, fts = loaded[0], loaded[1:]
    x, y = _inputs(data or lb.dataset, lb, samples)
    cfg = get_method("merge", "atlas").make_config({"objective": objective, "partitions": partitions,
                                                    "blockwise": not per_model, "lr": lr, "epochs": epochs,
                                                    "steps": steps, "seed": seed})
    res = atlas(lb.model, [f.model for f in fts], ClassificationEvaluator(x, y), cfg, device=device)
    composed = copy.deepcopy(lb.model)
    composed.load_state_dict(res.state_dict)
    report = {"coefficients_learned": res.coefficients.numel(), "seconds": round(res.seconds, 3),
              "loss_start": res.losses[0], "loss_end": res.losses[-1], "data": data or lb.dataset,
              "samples": len(x), "objective": objective,
              "accuracy": {"base": _accuracy(lb.model, lb.dataset),
                           **{f.ref: _accuracy(f.model, lb.dataset) for f in fts},
                           "composed": _accuracy(composed, lb.dataset)}}
    coefs = {"finetunes": finetunes, "blocks": res.blocks, "coefficients": res.coefficients.tolist()}
    files = {"atlas-coefficients.json": json.dumps(coefs) + "\n",
             "atlas-report.json": json.dumps(report, indent=1) + "\n"}
    prov = Provenance(method="merge/atlas", params={**cfg.model_dump(), **report}, inputs=[base, *finetunes])
    save_aligned(lb, composed, out, prov, [lm.path for lm in loaded if lm.path is not None], files, force=force)
    if emit_json(report, json_out):
        return
    acc = report["accuracy"]
    console.print(f"[green]composed[/] {len(fts)} task vectors with {report['coefficients_learned']} coefficients "
                  f"({res.seconds:.1f} s); test accuracy base {acc['base']:.4f} -> composed {acc['composed']:.4f}; "
                  f"wrote {out}")
