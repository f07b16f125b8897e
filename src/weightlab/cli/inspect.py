"""``weightlab inspect``: spectral and diff diagnostics of a checkpoint, as tables, JSON and an HTML report."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table as RichTable

from ..errors import ConfigError
from . import app
from ._common import check_outputs, console, device_option, err_console, force_option, json_option


def _f(v, d=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{d}f}" if abs(v) < 1e6 else f"{v:.3e}"
    return str(v)


@app.command("inspect")
def inspect_command(
    path: str = typer.Argument(..., help="checkpoint file or folder, or zoo:smollm2 / zoo:minilm"),
    base: str | None = typer.Option(None, "--base", help="compare with this base checkpoint (fine-tune / compression "
                                                          "diff: change norms and ranks, intruder dimensions)"),
    json_out: str | None = json_option("{layers, diff, summary}"),
    report: str | None = typer.Option(None, "--report", metavar="FILE.html",
                                      help="write a self-contained HTML report (charts, sortable tables)"),
    k: int = typer.Option(10, "--k", help="top-k singular vectors checked for intruders"),
    eps: float = typer.Option(0.5, "--eps", help="intruder threshold on max |cos| with the base's singular vectors"),
    threads: int | None = typer.Option(None, "--threads", help="worker threads (default: one per core)"),
    include: str | None = typer.Option(None, "--include", help="regex: only tensors whose name matches"),
    exclude: str | None = typer.Option(None, "--exclude", help="regex: skip tensors whose name matches"),
    plot: list[str] = typer.Option([], "--plot", help="layer whose spectrum the report plots (repeatable; "
                                                      "default: a few chosen by alpha)"),
    top: int = typer.Option(8, "--top", help="how many layers to list per table"),
    heads: str | None = typer.Option(None, "--heads", metavar="DOMAINS",
                                     help="causal LMs: add the attention-sink / dormant-head map for these text "
                                          "domains (e.g. wiki,code; linear dormant test) to the report"),
    neurons: str | None = typer.Option(None, "--neurons", metavar="WORD|all",
                                       help="causal LMs: add feature neurons to the report: those decoding to WORD, "
                                            "or with 'all' the most confident neuron of every layer"),
    device: str = device_option(),
    force: bool = force_option(),
) -> None:
    """Per weight matrix: norms, ranks, power-law alpha of the eigenvalue spectrum (WeightWatcher's method),
    KS distance, MP spikes and warnings; conv filter quality; with --base, what changed.

    \b
    --device: Gram matrices and eigenvalues are computed there in float64 (cpu: numpy; mps has no
    float64, so auto falls back to the CPU there). Under torchrun (WORLD_SIZE > 1) the weight
    matrices are split over the processes, balanced by cost; rank 0 prints and writes the outputs,
    which equal a one-process run.
    """
    from ..inspect.analysis import resolve_inspect_device, analyze

    if report is not None and Path(report).is_dir():
        raise ConfigError(f"--report '{report}' is a folder; give a file name such as report.html")
    check_outputs([json_out, report], [path, base], force)
    dev = resolve_inspect_device(device, None)  # an unavailable device is one error line before any work
    if (heads or neurons) and not report:
        raise ConfigError("--heads/--neurons add sections to the HTML report: give --report FILE.html too")
    options = {"threads": threads, "include": include, "exclude": exclude}
    with _process_group() as rank:
        res = analyze(path, base=base, k=k, eps=eps, device=dev,
                      **{kk: v for kk, v in options.items() if v is not None})
    if rank != 0:
        return  # every rank holds the same result; one writes it
    if json_out == "-":
        print(res.to_json(indent=1))
    elif json_out:
        res.to_json(json_out)
        err_console.print(f"wrote {json_out}")
    if report and (heads or neurons):
        _attach_internals(res, path, heads, neurons, device)
    if report:
        res.write_html(report, plot_layers=plot or None)
        err_console.print(f"wrote {report}")
    if json_out == "-":
        return
    s = res.summary
    t = RichTable(show_header=False, box=None, title=f"[bold]{s.get('model')}[/]")
    m = s.get("mean", {})
    t.add_row("weight matrices", f"{s['layers']} analysed, {len(s.get('skipped', []))} skipped, "
                                 f"{len(s.get('failed_fits', []))} failed fits")
    t.add_row("alpha", f"median {_f(s.get('median_alpha'))}, mean {_f(m.get('alpha'))}; "
                       f"{len(s.get('alpha_below_2', []))} below 2, {len(s.get('alpha_above_6', []))} above 6")
    t.add_row("means", f"alpha_weighted {_f(m.get('alpha_weighted'))}, log_norm {_f(m.get('log_norm'))}, "
                       f"log_spectral_norm {_f(m.get('log_spectral_norm'))}, stable_rank {_f(m.get('stable_rank'), 1)}")
    if s.get("filters"):
        fl = s["filters"]
        t.add_row("conv filters", f"{fl['layers']} layers, {len(fl['flagged'])} flagged, mean sparsity "
                                  f"{_f(fl['mean_sparsity'])}, mean orthogonality {_f(fl['mean_orthogonality'])}")
    t.add_row("time", f"{s['seconds']:.2f} s on {s['threads']} thread(s)")
    console.print(t)
    if s.get("layers_with_warnings"):
        console.print(f"{s['layers_with_warnings']} layers have warnings (see --json or --report)")
    fitted = [r for r in res if r.get("alpha") is not None]
    if fitted:
        tt = RichTable(title="lowest and highest alpha")
        tt.add_column("layer", overflow="fold", min_width=30)
        for c in ("alpha", "alpha_w", "KS D", "eff. rank", "warnings"):
            tt.add_column(c, justify="right", no_wrap=True)
        by = sorted(fitted, key=lambda r: r["alpha"])
        picks = by[:top // 2] + [r for r in by[-(top - top // 2):] if r not in by[:top // 2]]
        for r in picks:
            tt.add_row(r["name"], _f(r["alpha"]), _f(r.get("alpha_weighted")),
                       _f(r.get("ks_distance")), _f(r.get("effective_rank"), 1),
                       str(len(r.get("warnings") or [])))
        console.print(tt)
    d = s.get("diff")
    if d:
        console.print(f"[bold]diff against {d['base']}[/]: {d['changed']} of {d['compared']} tensors changed, "
                      f"relative change {_f(d.get('total_rel_change'), 5)}; intruders (k={d['intruders']['k']}, "
                      f"eps={d['intruders']['eps']:g}): {d['intruders']['total']} in "
                      f"{d['intruders']['layers_with_intruders']} matrices. {d.get('depth_verdict', '')}")
        dt = RichTable(title="most changed matrices")
        dt.add_column("tensor", overflow="fold", min_width=30)
        for c in ("rel. change", "d eff. rank", "d num. rank", "intruders", "cos top-k"):
            dt.add_column(c, justify="right", no_wrap=True)
        rows = {r["name"]: r for r in res.diff}
        for e in d["most_changed"][:top]:
            r = rows[e["name"]]
            dt.add_row(r["name"], _f(r.get("rel_change"), 5), _f(r.get("delta_effective_rank"), 1),
                       _f(r.get("delta_numerical_rank")), _f(r.get("intruders")), _f(r.get("change_topk_cos")))
        console.print(dt)
        for key, label in (("only_in_model", "only in the model"), ("only_in_base", "only in the base"),
                           ("shape_mismatch", "shape differs")):
            if d.get(key):
                err_console.print(f"[yellow]{len(d[key])} tensor(s) {label}:[/] " + ", ".join(d[key][:6])
                                  + (" ..." if len(d[key]) > 6 else ""))


def _process_group():
    """Under torchrun (WORLD_SIZE > 1) join the process group for the run (gloo: only Python objects are
    exchanged, whatever the compute device) and yield this rank; otherwise yield 0."""
    import contextlib
    import os

    @contextlib.contextmanager
    def cm():
        import torch.distributed as dist

        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
            yield dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            return
        dist.init_process_group("gloo")
        try:
            yield dist.get_rank()
        finally:
            dist.destroy_process_group()

    return cm()


def _attach_internals(res, path: str, heads: str | None, neurons: str | None, device: str = "cpu") -> None:
    """Load the model once as a causal LM and put the heads map / neuron table into the report."""
    from ..inspect.heads import analyze_heads
    from ..inspect.internals_html import attach
    from ..inspect.neurons import NeuronsConfig, decode_neurons, token_variants
    from ..io.hf import load_causal_lm
    from ..io.refs import resolve_model
    from ..registry import get_method

    model, tok = load_causal_lm(resolve_model(path))
    if heads:
        cfg = get_method("inspect", "heads").make_config(
            {"domains": [d.strip() for d in heads.split(",") if d.strip()]})
        attach(res, heads=analyze_heads(model, tok, cfg, device=device))
    if neurons:
        ids = None if neurons == "all" else token_variants(tok, neurons)
        nmap = decode_neurons(model, NeuronsConfig(), token_ids=ids, device=device)
        if ids:
            rows = nmap.rows(tok, best_first=True, limit=20)
        else:
            best: dict[int, dict] = {}
            for r in nmap.rows():  # token ids, decoded below only for the kept rows
                if r["layer"] not in best or r["score"] > best[r["layer"]]["score"]:
                    best[r["layer"]] = r
            rows = [{**r, "top_tokens": [tok.decode([t]) for t in r["top_tokens"]]} for _, r in sorted(best.items())]
        note = ("down-projection columns decoded through the final norm and LM head; "
                + (f"best matches for {neurons!r}" if ids else "the most confident neuron of each layer"))
        attach(res, neurons=rows, neurons_note=note)
