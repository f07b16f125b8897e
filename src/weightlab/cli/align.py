from __future__ import annotations

import json
from pathlib import Path

import typer

from . import app
from ._common import console, print_json

_REF_HELP = "zoo:DATASET-KIND-seedN (e.g. zoo:digits-mlp-seed0), a folder written by weightlab align, or an HF folder"


def _spec(spec: str):
    return "auto" if spec == "auto" else spec


@app.command()
def align(a: str = typer.Argument(..., help=f"reference model A: {_REF_HELP}"),
          b: str = typer.Argument(..., help="model B, same architecture; it is permuted into A's basis"),
          spec: str = typer.Option("auto", "--spec", help="auto, or a JSON/YAML permutation spec file"),
          seed: int = typer.Option(0, "--seed", help="order in which permutations are visited"),
          out: str = typer.Option(..., "--out", "-o", help="folder to create (B permuted; loads like B)"),
          force: bool = typer.Option(False, "--force")) -> None:
    """Weight matching: write B with its hidden units permuted to line up with A's (same function as B)."""
    from ..align import WeightMatchingConfig, match_state_dicts, permuted_copy, resolve_spec
    from ..align.models import load_model, save_aligned
    from ..errors import ConfigError, OutputExistsError
    from ..io.provenance import Provenance

    if Path(out).exists() and not force:
        raise OutputExistsError(f"output '{out}' already exists; pass --force to replace it")
    la, lb = load_model(a), load_model(b)
    if type(la.model) is not type(lb.model):
        raise ConfigError(f"A is a {type(la.model).__name__} but B is a {type(lb.model).__name__}")
    s = resolve_spec(la.model, _spec(spec))
    buffers = {k for k, _ in la.model.named_buffers()}
    res = match_state_dicts(s, la.model.state_dict(), lb.model.state_dict(), WeightMatchingConfig(seed=seed),
                            skip=buffers)
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
            json_out: bool = typer.Option(False, "--json", help="print the result as JSON")) -> None:
    """Linear mode connectivity: loss and accuracy along A -> B before and after weight matching, the barrier
    (reference: max L - (L(A)+L(B))/2; linear: height above the chord) and the singular-vector analysis."""
    from ..align import ConnectivityConfig, connectivity
    from ..align.models import load_model
    from ..align.report import plot_paths, write_report
    from ..engine.evaluators import CausalLMEvaluator, ClassificationEvaluator
    from ..errors import ConfigError

    la, lb = load_model(a), load_model(b)
    bn_data = None
    if la.kind == "classifier":
        from ..zoo import load_dataset

        ds = load_dataset(data or la.dataset)
        evaluator = ClassificationEvaluator(ds.x_test, ds.y_test)
        bn_data = ds.x_train
    elif la.kind == "causal-lm":
        from ..engine.calib_data import load_text

        evaluator = CausalLMEvaluator(la.tokenizer, load_text(data or "wiki", "heldout"), seqlen=256,
                                      max_tokens=max_tokens)
    else:
        raise ConfigError("connect needs a loss: it works on zoo classifiers and causal LMs; "
                          "for an encoder use weightlab align and your own evaluation")
    res = connectivity(la.model, lb.model, evaluator, _spec(spec),
                       ConnectivityConfig(points=points, align=not no_align), bn_data=bn_data)
    summary = res.summary()
    if plot:
        from ..zoo._cache import atomic_file

        with atomic_file(Path(plot)) as tmp:
            tmp.write_bytes(plot_paths(res, f"{a} -> {b}"))
    if report:
        write_report(res, report, f"Linear mode connectivity: {a} -> {b}",
                     {"a": a, "b": b, "data": data or la.dataset or "wiki", "points": points})
    if json_out:
        print_json({**summary, "before_path": res.before.as_dict(),
                    "after_path": res.after.as_dict() if res.after else None})
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
