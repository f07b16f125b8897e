from __future__ import annotations

import typer
from rich.table import Table

from ..registry import list_methods
from . import app
from ._common import console, emit_json, json_option


@app.command()
def methods(family: str = typer.Option(None, "--family", help="inspect, adapt, merge, compress or data"),
            json_out: str = json_option("the methods")) -> None:
    """List every registered method with its paper, memory regime and defaults."""
    specs = list_methods(family)
    if emit_json([{"family": s.family, "name": s.name, "kind": s.kind, "regime": s.regime.value,
                   "paper": s.paper, "summary": s.summary, "defaults": s.defaults()} for s in specs], json_out):
        return
    t = Table("family", "method", "kind", "regime", "paper", "what it does")
    for s in specs:
        t.add_row(s.family, s.name, s.kind, s.regime.value, s.paper, s.summary)
    console.print(t)
