from __future__ import annotations

import typer
from rich.markup import escape

from ..registry import get_method, list_methods
from . import app
from ._common import console, emit_json, json_option


def _record(s) -> dict:
    return {"family": s.family, "name": s.name, "kind": s.kind, "regime": s.regime.value, "paper": s.paper,
            "summary": s.summary, "defaults": s.defaults()}


@app.command()
def methods(name: str = typer.Argument(None, help="a method's name (or FAMILY/NAME): its paper, parameters and "
                                                   "defaults"),
            family: str = typer.Option(None, "--family", help="inspect, adapt, merge, compress, data or align"),
            json_out: str = json_option("the methods")) -> None:
    """List every registered method, one line each; `weightlab methods NAME` shows one in full."""
    if name:
        _details(name, family, json_out)
        return
    specs = list_methods(family)
    if emit_json([_record(s) for s in specs], json_out):
        return
    width = max(len(f"{s.family}/{s.name}") for s in specs)
    kw = max(len(s.kind) for s in specs)
    room = max(20, console.width - width - kw - 5)
    for s in specs:
        summary = s.summary if len(s.summary) <= room else s.summary[:room - 3] + "..."
        console.print(f"{escape(f'{s.family}/{s.name}'):<{width}}  [dim]{s.kind:<{kw}}[/]  {escape(summary)}",
                      highlight=False, overflow="ellipsis", no_wrap=True)
    console.print(f"[dim]{len(specs)} methods; `weightlab methods NAME` shows a method's paper and defaults[/]",
                  highlight=False)


def _details(name: str, family: str | None, json_out: str | None) -> None:
    if "/" in name:
        family, name = name.split("/", 1)
    matches = [s for s in list_methods(family) if s.name == name]
    if not matches:
        get_method(family or "compress", name) if family else None  # its "did you mean" error
        from ..errors import ConfigError

        raise ConfigError(f"no method named '{name}'; `weightlab methods` lists them")
    for s in matches:
        if emit_json(_record(s), json_out):
            continue
        console.print(f"[bold]{escape(s.family)}/{escape(s.name)}[/]  ({s.kind}, {s.regime.value})", highlight=False)
        console.print(f"  {escape(s.summary)}", highlight=False)
        console.print(f"  paper: {escape(s.paper)}", highlight=False)
        fields = s.config.model_fields
        if fields:
            console.print("  parameters (default):", highlight=False)
        for pname, f in fields.items():
            default = "required" if f.is_required() else repr(s.defaults().get(f.alias or pname))
            desc = f" - {f.description}" if f.description else ""
            console.print(f"    {escape(f.alias or pname)} = {escape(default)}{escape(desc)}", highlight=False)
