from __future__ import annotations

import typer

from . import app
from ._common import console


@app.command()
def demo(out: str = typer.Option("weightlab-demo", "--out", "-o", help="result folder"),
         force: bool = typer.Option(False, "--force", help="replace an existing result folder"),
         eval_tokens: int = typer.Option(16384, "--eval-tokens", help="held-out tokens for perplexity"),
         only: list[str] = typer.Option(None, "--only", help="run only these sections")) -> None:
    """Run weightlab's main job offline on SmolLM2-135M and write a result folder."""
    from ..demo import run_demo

    run_demo(out, force=force, eval_tokens=eval_tokens, log=lambda s: console.print(s, highlight=False), only=only)
