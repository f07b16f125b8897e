"""weightlab elastic commands of d2nwg (registered on cli.elastic's apps): ``elastic train d2nwg`` makes a
generator (zoo + weight VAE + conditional latent diffusion), ``elastic generate`` writes weights for a dataset."""
from __future__ import annotations

from pathlib import Path

import typer

from ._common import console, emit_json, err_console, force_option, json_option
from .elastic import elastic_app, train_app


@train_app.command("d2nwg")
def train_d2nwg_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="generator folder to create"),
    dataset: str = typer.Option(None, "--dataset", help="zoo dataset the tasks are class subsets of: digits "
                                                        "(default) or mnist1d"),
    tasks: int = typer.Option(None, "--tasks", help="zoo (training) tasks, each a class subset (default 60)"),
    models_per_task: int = typer.Option(None, "--models-per-task", help="zoo models per task (default 5)"),
    seed: int = typer.Option(None, "--seed", help="seed of the task choice, the zoo and the training (default 0)"),
    param: list[str] = typer.Option(None, "--param", "-p", help="D2NWG parameter KEY=VALUE (repeatable), see "
                                                                "`weightlab methods d2nwg`"),
    json_out: str = json_option("the training summary"),
    force: bool = force_option(),
) -> None:
    """Build the model zoo, train the weight VAE and the dataset-conditioned latent diffusion model."""
    from ..elastic.d2nwg import D2NWGConfig, train_d2nwg
    from ..errors import OutputExistsError
    from ..registry import get_method
    from ._compress import parse_params

    params = parse_params(param)
    for key, val in (("dataset", dataset), ("train_tasks", tasks), ("models_per_task", models_per_task),
                     ("seed", seed)):
        if val is not None:
            params[key] = val
    cfg = get_method("elastic", "d2nwg").make_config(params)
    assert isinstance(cfg, D2NWGConfig)
    if out.exists() and not force:  # before minutes of training
        raise OutputExistsError(f"'{out}' already exists; pass --force to replace it")
    to_stdout = json_out == "-"
    say = (err_console if to_stdout else console).print
    gen = train_d2nwg(cfg, log=lambda m: say(m, highlight=False, markup=False))
    gen.save(out, force=force)
    summary = {"generator": str(out), "train_tasks": gen.info["train_tasks"],
               "heldout_tasks": gen.info["heldout_tasks"], "zoo_models": int(gen.zoo.shape[0]),
               "zoo_val_accuracy": gen.info["zoo_accuracy"], "losses": gen.info["losses"],
               "seconds": gen.info["seconds"]}
    if not emit_json(summary, json_out):
        held = " ".join(",".join(map(str, c)) for c in gen.info["heldout_tasks"][:3])
        console.print(f"wrote {out}: {summary['zoo_models']} zoo models on {len(summary['train_tasks'])} tasks; "
                      f"unseen tasks kept out include {held or 'none'}", highlight=False, markup=False)


@elastic_app.command("generate")
def generate_cmd(
    generator: Path = typer.Argument(..., help="generator folder from `weightlab elastic train d2nwg`"),
    dataset: str = typer.Option(..., "--dataset", help="NAME:c1,c2,... (a class subset of a zoo dataset, e.g. "
                                                       "digits:0,2,4,6,8) or a .safetensors file with x and y"),
    out: Path = typer.Option(..., "--out", "-o", help="model folder to create"),
    seed: int = typer.Option(0, "--seed", help="seed of the condition draw and the diffusion sampling"),
    samples: int = typer.Option(1, "--samples", help="draw N and keep the best on the dataset's validation part"),
    sampler: str = typer.Option("ddpm", "--sampler", help="ddpm (ancestral, all steps) or ddim"),
    ddim_steps: int = typer.Option(50, "--ddim-steps", help="steps of the ddim sampler"),
    json_out: str = json_option("what was generated"),
    force: bool = force_option(),
) -> None:
    """Generate a model's weights for a dataset (seen in training or not) with a D2NWG generator."""
    from ..elastic.d2nwg_generate import generate_job

    info = generate_job(generator, dataset, out, seed=seed, samples=samples, sampler=sampler,
                        ddim_steps=ddim_steps, force=force)
    if not emit_json(info, json_out):
        console.print(f"wrote {out}: {info['dataset']} ({'in the zoo' if info['task_in_zoo'] else 'unseen task'}), "
                      f"val accuracy {info['val_accuracy']:.3f}, test {info['test_accuracy']:.3f}",
                      highlight=False, markup=False)
