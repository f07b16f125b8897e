from __future__ import annotations

import typer

from . import app
from ._common import console
from ._compress import parse_params, placement_options

_DEV, _DT, _SEQ, _OFF, _MAXMEM = placement_options()


@app.command()
def prune(path: str = typer.Argument(..., help="model folder (HF causal LM or encoder, or a zoo classifier folder)"),
          method: str = typer.Option("wanda", "--method", "-m", help="magnitude, wanda, sparsegpt, gblm, dpruner"),
          sparsity: float = typer.Option(None, "--sparsity", "-s", help="share of weights to prune (default 0.5; "
                                         "an N:M pattern sets it to N/M)"),
          pattern: str = typer.Option(None, "--pattern", help="N:M pattern, e.g. 2:4"),
          allocation: str = typer.Option("uniform", "--allocation", help="uniform, global, lamp, dimap, rd"),
          calib: str = typer.Option("wiki", "--calib", help="wiki or a .txt/.jsonl file"),
          nsamples: int = typer.Option(32, "--nsamples"), seqlen: int = typer.Option(512, "--seqlen"),
          seed: int = typer.Option(0, "--seed"),
          sampling: str = typer.Option("random", "--sampling", help="random (seeded) or consecutive windows"),
          eval_data: str = typer.Option("wiki", "--eval", help="wiki (held-out split) or a file"),
          eval_tokens: int = typer.Option(16384, "--eval-tokens"),
          no_eval: bool = typer.Option(False, "--no-eval", help="skip the before/after evaluation"),
          param: list[str] = typer.Option(None, "--param", "-p", help="rule parameter KEY=VALUE"),
          fmt: str = typer.Option("hf", "--format", "-f",
                                  help="hf or compressed-tensors; both are written dense (zeros kept: vLLM and "
                                       "compressed-tensors dropped their sparse formats) with the sparsity recorded "
                                       "in the model card and metadata"),
          device: str = _DEV, dtype: str = _DT, sequential: bool = _SEQ, offload_activations: bool = _OFF,
          max_memory: str = _MAXMEM,
          out: str = typer.Option(..., "--out", "-o"), force: bool = typer.Option(False, "--force")) -> None:
    """Prune a model and print its quality before and after (perplexity, similarity or accuracy)."""
    from ..compress.jobs import prune_job

    rep, _ = prune_job(path, out, method, sparsity, pattern=pattern, allocation=allocation, calib=calib,
                       nsamples=nsamples, seqlen=seqlen, seed=seed, sampling=sampling, eval_data=eval_data,
                       eval_tokens=eval_tokens, no_eval=no_eval, params=parse_params(param), fmt=fmt, device=device,
                       dtype=dtype, sequential=sequential, offload_activations=offload_activations,
                       max_memory=max_memory, force=force, log=console.print)
    if rep is not None:
        console.print(f"[green]pruned[/] {len(rep.layers)} layers to {rep.sparsity:.2%} ({rep.method}, "
                      f"{rep.allocation}{', ' + pattern if pattern else ''}) in {rep.seconds:.1f} s -> {out}")
        console.print(rep.note)
