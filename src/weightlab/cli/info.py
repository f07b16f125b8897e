from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from ..io.deployed import describe_line
from ..io.describe import describe
from ..io.refs import resolve_model
from . import app
from ._common import console, emit_json, human, human_bytes, json_option

@app.command()
def info(path: str = typer.Argument(..., help="checkpoint file or folder, or zoo:smollm2 / zoo:minilm"),
         json_out: str = json_option("everything info reports"),
         all_tensors: bool = typer.Option(False, "--all", help="list every tensor, not just the first 20")) -> None:
    """Format, tensor and parameter counts, dtypes, shards and architecture of a checkpoint."""
    d = describe(resolve_model(path))
    if emit_json(d, json_out):
        return
    t = _Plain(show_header=False, box=None)
    t.add_row("path", d["path"])
    t.add_row("format", d["format"])
    if d["quantization"]:
        t.add_row("quantization", describe_line(d["quantization"]))
    t.add_row("architecture", str(d["architecture"] or "-"))
    t.add_row("tensors", str(d["num_tensors"]))
    t.add_row("parameters", f"{d['num_parameters']:,} ({human(d['num_parameters'])})")
    t.add_row("size", human_bytes(d["size_bytes"]))
    t.add_row("dtypes", ", ".join(f"{k}: {human(v)}" for k, v in d["dtypes"].items()))
    t.add_row("files", f"{len(d['files'])}: " + ", ".join(d["files"][:4]) + (" ..." if len(d["files"]) > 4 else ""))
    for k, v in d["config"].items():
        t.add_row(k, str(v))
    if d["made_by"]:
        t.add_row("made by", f"weightlab {d['made_by']['method']}")
    console.print(t)
    rows = d["tensors"] if all_tensors else d["tensors"][:20]
    tt = _Plain("name", "shape", "dtype", title=Text(f"tensors ({len(rows)} of {d['num_tensors']})"))
    for r in rows:
        tt.add_row(r["name"], "x".join(map(str, r["shape"])) or "scalar", r["dtype"])
    console.print(tt)


class _Plain(Table):
    """A table whose cells are shown as given: names from files are not rich markup ('[/]' is a valid name)."""

    def add_row(self, *cells, **kw):
        super().add_row(*(Text(str(c)) for c in cells), **kw)
