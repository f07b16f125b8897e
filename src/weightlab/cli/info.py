from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer
from rich.table import Table

from ..io.deployed import describe_line, quantization_of
from ..io.dtypes import dtype_name
from ..io.provenance import Provenance
from ..io.reader import open_checkpoint
from ..recipe.models import resolve_model
from . import app
from ._common import console, human, human_bytes, print_json

CONFIG_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings")


def describe(path: Path) -> dict:
    """Everything `weightlab info` reports, as a plain dict."""
    with open_checkpoint(path) as ck:
        infos = ck.infos()
        by_dtype: Counter = Counter()
        for i in infos:
            by_dtype[dtype_name(i.dtype)] += i.numel
        cfg = ck.config or {}
        prov = Provenance.from_metadata(ck.metadata)
        # quantized folders: logical weights, not packed int32 words, count as parameters
        quant = quantization_of(ck.raw or ck) or ck.quantization
        if quant and quant["format"] == "weightlab-packed":
            cfg = cfg.get("original_config", cfg)  # its config.json is fenced off from transformers
        return {
            "path": str(ck.path),
            "format": quant["format"] if quant else ck.format,
            "container": ck.format,
            "quantization": quant,
            "architecture": cfg.get("architectures", [ck.architecture])[0] if cfg.get("architectures") else
            ck.architecture,
            "num_tensors": len(infos),
            "num_parameters": quant.get("parameters", ck.num_parameters) if quant else ck.num_parameters,
            "size_bytes": sum(i.nbytes for i in infos),
            "dtypes": dict(by_dtype),
            "files": [str(f.name) for f in ck.files],
            "config": {k: cfg[k] for k in CONFIG_KEYS if k in cfg},
            "made_by": None if prov is None else {"method": prov.method, "params": prov.params,
                                                  "inputs": prov.inputs},
            "tensors": [i.as_dict() for i in infos],
        }


@app.command()
def info(path: str = typer.Argument(..., help="checkpoint file or folder, or zoo:smollm2 / zoo:minilm"),
         json_out: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
         all_tensors: bool = typer.Option(False, "--all", help="list every tensor, not just the first 20")) -> None:
    """Format, tensor and parameter counts, dtypes, shards and architecture of a checkpoint."""
    d = describe(resolve_model(path))
    if json_out:
        print_json(d)
        return
    t = Table(show_header=False, box=None)
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
    tt = Table("name", "shape", "dtype", title=f"tensors ({len(rows)} of {d['num_tensors']})")
    for r in rows:
        tt.add_row(r["name"], "x".join(map(str, r["shape"])) or "scalar", r["dtype"])
    console.print(tt)
