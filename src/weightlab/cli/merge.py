from __future__ import annotations

from pathlib import Path

import typer
import yaml

from ..errors import ConfigError
from ..io.refs import resolve_model
from . import app
from ._common import console


def _value(text: str):
    return yaml.safe_load(text)


@app.command(context_settings={"allow_interspersed_args": True})
def merge(
    args: list[str] = typer.Argument(None, help="CONFIG.yaml OUT_DIR, or with --method: the model paths"),
    method: str = typer.Option(None, "--method", "-m", help="merge method (flag form): linear, ties, dare, ..."),
    base: str = typer.Option(None, "--base", help="base model (flag form)"),
    out: str = typer.Option(None, "--out", "-o", help="output folder (flag form)"),
    weight: list[float] = typer.Option(None, "--weight", "-w", help="per-model weight, once per model"),
    density: float = typer.Option(None, "--density", help="share of each task vector kept (ties, dare)"),
    lam: float = typer.Option(None, "--lambda", help="scale of the merged task vector"),
    param: list[str] = typer.Option(None, "--param", "-p", help="method parameter KEY=VALUE (repeatable)"),
    dtype: str = typer.Option(None, "--dtype", help="output dtype (default: the base's)"),
    seed: int = typer.Option(None, "--seed", help="random seed (dare)"),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="merge even if inputs hold NaN/Inf"),
    force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
    device: str = typer.Option(None, "--device", help="where ties, tsv-m and r-tsvm compute (default cpu; "
                                                      "auto, cuda, cuda:N); reading, writing and the other "
                                                      "rules stay on the CPU"),
) -> None:
    """Merge models: a weightlab or mergekit YAML config, or the flag form for quick use.

    \b
    weightlab merge config.yaml OUT_DIR
    weightlab merge --method ties --base B M1 M2 --density 0.5 -o OUT
    """
    from ..merge import run_merge
    from ..merge.api import load_merge_config
    from ..merge.job import MergeJob

    args = args or []
    if method is None:
        if len(args) != 2:
            raise ConfigError("give CONFIG.yaml OUT_DIR, or use the flag form: --method M [--base B] MODELS... -o OUT")
        job = load_merge_config(args[0])
        target = args[1]
    else:
        if not args:
            raise ConfigError("the flag form needs the model paths: weightlab merge --method M MODEL1 MODEL2 -o OUT")
        if out is None:
            raise ConfigError("the flag form needs an output folder: -o OUT")
        if weight and len(weight) != len(args):
            raise ConfigError(f"got {len(weight)} --weight values for {len(args)} models; give one per model")
        params = {}
        for kv in param or []:
            if "=" not in kv:
                raise ConfigError(f"--param expects KEY=VALUE, got {kv!r}")
            k, v = kv.split("=", 1)
            params[k.strip()] = _value(v)
        if density is not None:
            params["density"] = density
        if lam is not None:
            params["lambda"] = lam
        models = [{"path": str(resolve_model(a)), **({"weight": weight[i]} if weight else {})}
                  for i, a in enumerate(args)]
        job = MergeJob(method=method, models=models, base=str(resolve_model(base)) if base else None,
                       params=params, dtype=dtype)
        target = out
    if seed is not None:
        job.seed = seed
    if device is not None:  # the flag wins over a config file's device
        job.device = device
    if allow_nonfinite:
        job.allow_nonfinite = True
    res = run_merge(job, Path(target), force=force)
    r = res.report
    console.print(f"[green]merged[/] {r['merged']} tensors ({r['copied_from_base']} copied from the base) with "
                  f"{r['method']} in {r['seconds']:.1f} s -> {res.output}")
