"""`weightlab neurons` (decode, search, clamp, compare MLP neurons) and `weightlab heads` (sinks, dormant heads)."""
from __future__ import annotations


import click
import typer
from typer.core import TyperGroup

from . import app
from ._common import (check_outputs, console, device_option, dtype_option, emit_json, err_console, force_option,
                      json_option)


class _ShowByDefault(TyperGroup):
    """`weightlab neurons PATH ...` means `weightlab neurons show PATH ...`; subcommands keep their names."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["show", *args]
        return super().parse_args(ctx, args)


neurons_app = typer.Typer(cls=_ShowByDefault, no_args_is_help=True,
                          help="MLP neurons decoded through the LM head: list or search by token (default), "
                               "clamp during generation, compare two models.")
app.add_typer(neurons_app, name="neurons")


def _policy(device: str, dtype: str):
    """(device, forward dtype) from the shared policy, resolved before any loading: a missing CUDA is one line."""
    from ..engine.device import device_policy

    return device_policy(device, dtype)


def _load(path: str, policy=None):
    """The causal LM in the policy's forward dtype, on its device (CPU fp32 without a policy)."""
    from ..io.hf import load_causal_lm
    from ..io.refs import resolve_model

    if policy is None:
        return load_causal_lm(resolve_model(path))
    dev, dt = policy
    model, tok = load_causal_lm(resolve_model(path), dtype=dt)
    return model.to(dev), tok


def _write(path: str, text: str) -> None:
    from ..io.atomic import write_file_atomic

    write_file_atomic(path, text)


_OUT = [console]


def _route(json_out: str | None) -> None:
    """With --json - the JSON owns stdout: the human-readable lines go to stderr."""
    _OUT[0] = err_console if json_out == "-" else console


def _say(text: str) -> None:
    _OUT[0].print(text, markup=False, highlight=False)


def _toks(tokens) -> str:
    return " | ".join(repr(t) for t in tokens)


@neurons_app.command("show")
def show(path: str = typer.Argument(..., help="causal LM folder or zoo:smollm2"),
         token: str = typer.Option(None, "--token", help="find neurons that decode to this word"),
         layer: list[int] = typer.Option(None, "--layer", "-l", help="only these layers (repeatable)"),
         vector: str = typer.Option("down", "--vector", help="down (written to the residual stream), up or gate"),
         top_k: int = typer.Option(5, "--top-k"), limit: int = typer.Option(20, "--limit", help="neurons printed"),
         negative: bool = typer.Option(False, "--negative", help="decode -v: what a firing neuron suppresses"),
         json_out: str = json_option("[{layer, neuron, top_tokens, score}]"), force: bool = force_option(),
         report: str = typer.Option(None, "--report", help="write the printed neurons as an HTML table here"),
         device: str = device_option(), dtype: str = dtype_option()) -> None:
    """Decode every MLP neuron through the final norm and LM head; with --token, best matches first."""
    _route(json_out)
    check_outputs([json_out, report], [path], force)
    from ..inspect.internals_html import render_neurons
    from ..inspect.neurons import NeuronsConfig, decode_neurons, token_variants

    cfg = NeuronsConfig(vector=vector, top_k=top_k, layers=layer or None, negative=negative)
    model, tok = _load(path, _policy(device, dtype))
    ids = token_variants(tok, token) if token else None
    nmap = decode_neurons(model, cfg, token_ids=ids)
    n_layers = len(nmap.top_ids)
    _say(f"decoded {nmap.neurons:,} {vector} vectors of {n_layers} layers in {nmap.seconds:.2f} s "
         f"({nmap.seconds / max(1, n_layers):.3f} s per layer)")
    best = nmap.rows(tok, best_first=True, limit=limit)
    what = f"p({', '.join(repr(tok.decode([i])) for i in ids)})" if ids else "top-1 probability"
    _say(f"{'layer':>5} {'neuron':>6} {what:>12}  top tokens")
    for r in best:
        _say(f"{r['layer']:>5} {r['neuron']:>6} {r['score']:>12.4f}  {_toks(r['top_tokens'])}")
    if json_out:
        rows = best if token else nmap.rows(tok)
        emit_json(rows, json_out)
    if report:
        _write(report, render_neurons(best, note=f"{vector} vectors through the final norm and LM head; score: {what}"))


@neurons_app.command("clamp")
def clamp(path: str = typer.Argument(..., help="causal LM folder or zoo:smollm2"),
          neuron: list[str] = typer.Option(..., "--neuron", "-n", help="LAYER:INDEX (repeatable)"),
          value: float = typer.Option(..., "--value", "-v", help="activation forced at every position"),
          prompt: str = typer.Option(..., "--prompt"),
          max_new_tokens: int = typer.Option(20, "--max-new-tokens"),
          watch: list[str] = typer.Option(None, "--watch", help="also show this word's probability (repeatable)"),
          json_out: str = json_option("the comparison"), force: bool = force_option(),
          device: str = device_option(), dtype: str = dtype_option()) -> None:
    """Clamp neurons during generation; print next-token probabilities and greedy text with and without."""
    _route(json_out)
    check_outputs([json_out], [path], force)
    from ..inspect.neurons import clamp_neurons, parse_neuron, token_variants

    targets = [parse_neuron(s) for s in neuron]
    policy = _policy(device, dtype)
    model, tok = _load(path, policy)
    extra = [i for w in watch or [] for i in token_variants(tok, w)]
    r = clamp_neurons(model, tok, targets, value, prompt, max_new_tokens=max_new_tokens, watch=extra)
    for k, a in r["activation_on_prompt"].items():
        _say(f"neuron {k}: activation on the prompt ranges {a['min']:.3f} .. {a['max']:.3f}; clamped to {value:g}")
    _say("watched tokens (--watch words, then the neurons' own top tokens):")
    for w in r["watched"]:
        ratio = w["after"] / max(w["before"], 1e-30)
        _say(f"  {w['token']!r:>16}  {w['before']:.5f} -> {w['after']:.5f}  (x{ratio:.3g})")
    for side in ("before", "after"):
        tops = ", ".join(f"{t['token']!r} {t['prob']:.3f}" for t in r[side]["top"])
        _say(f"{side:>6} next token: {tops}")
        _say(f"{side:>6} text: {r[side]['text']!r}")
    if json_out:
        emit_json(r, json_out)


@neurons_app.command("compare")
def compare(path_a: str = typer.Argument(..., help="first causal LM"),
            path_b: str = typer.Argument(..., help="second causal LM of the same architecture and vocabulary"),
            vector: str = typer.Option("up", "--vector", help="up (as the paper), down or gate"),
            layer: list[int] = typer.Option(None, "--layer", "-l"),
            json_out: str = json_option(), force: bool = force_option(),
            device: str = device_option(), dtype: str = dtype_option()) -> None:
    """Share of neurons whose top decoded token is the same in both models."""
    _route(json_out)
    check_outputs([json_out], [path_a, path_b], force)
    from ..inspect.neurons import NeuronsConfig, compare_neurons

    policy = _policy(device, dtype)
    a, _ = _load(path_a, policy)
    b, _ = _load(path_b, policy)
    r = compare_neurons(a, b, NeuronsConfig(vector=vector, layers=layer or None))
    _say(f"{r['same_top_token']:.2%} of {r['neurons']:,} {vector} neurons keep their top token ({r['seconds']:.1f} s)")
    _say("per layer: " + " ".join(f"{k}:{v:.0%}" for k, v in r["per_layer"].items()))
    if json_out:
        emit_json(r, json_out)


@app.command("heads")
def heads(path: str = typer.Argument(..., help="causal LM folder or zoo:smollm2"),
          domains: str = typer.Option("wiki,code", "--domains", help="comma list: wiki, code, or .txt/.jsonl files"),
          windows: int = typer.Option(2, "--windows", help="token windows per domain"),
          seqlen: int = typer.Option(128, "--seqlen"),
          test: str = typer.Option("linear", "--test", help="dormant test: linear (one backward; understates large "
                                                          "changes), exact (a rerun per sink head), none"),
          all_heads: bool = typer.Option(False, "--all-heads", help="exact test on every head, not only sinks"),
          sink: float = typer.Option(0.5, "--sink-threshold"),
          dormant: float = typer.Option(0.01, "--dormant-threshold"),
          report: str = typer.Option(None, "--report", help="write an HTML map here"),
          json_out: str = json_option("every row"), force: bool = force_option(),
          device: str = device_option(), dtype: str = dtype_option()) -> None:
    """Attention sinks, value drains, residual peaks and active/dormant heads per text domain."""
    _route(json_out)
    check_outputs([json_out, report], [path], force)
    from ..inspect.heads import HeadsConfig, analyze_heads
    from ..inspect.internals_html import render_heads
    from ..registry import get_method

    cfg = get_method("inspect", "heads").make_config(dict(
        domains=[d.strip() for d in domains.split(",") if d.strip()], windows=windows, seqlen=seqlen,
        dormant_test=test, tested="all" if all_heads else "sinks", sink_threshold=sink, dormant_threshold=dormant))
    assert isinstance(cfg, HeadsConfig)
    model, tok = _load(path, _policy(device, dtype))
    rep = analyze_heads(model, tok, cfg)
    for dom, info in rep.domains.items():
        _say(f"{dom}: loss {info['loss']:.3f} on {info['tokens']} tokens; {info['sinks']}/{info['heads']} heads are "
             f"sinks, {info['dormant']} dormant, {info['active']} active ({info['dormant_test']} test, "
             f"{info['seconds']:.1f} s)")
    doms = list(rep.domains)
    if len(doms) > 1:
        by = {(r["domain"], r["layer"], r["head"]): r["state"] for r in rep.heads}
        keys = {(r["layer"], r["head"]) for r in rep.heads}
        switch = sorted(k for k in keys if len({by[(d, *k)] for d in doms}) > 1)
        _say(f"{len(switch)} heads change state between domains: "
             + ", ".join(f"L{li}H{h} ({'/'.join(by[(d, li, h)] for d in doms)})" for li, h in switch[:12])
             + (" ..." if len(switch) > 12 else ""))
    peak = max(rep.layers, key=lambda r: r["peak_ratio"])
    _say(f"residual peak: first-token norm is {peak['peak_ratio']:.0f}x the median token after layer {peak['layer']} "
         f"({peak['domain']})")
    if report:
        _write(report, render_heads(rep))
        _say(f"wrote {report}")
    if json_out:
        emit_json(rep.as_dict(), json_out)
