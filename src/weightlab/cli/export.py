"""``weightlab export``: write a model in a deployment format (GGUF, plain HF, compressed-tensors)."""
from __future__ import annotations

from pathlib import Path

import typer

from ..errors import ConfigError
from ..io.refs import resolve_model
from . import app
from ._common import console, emit_json, json_option

FORMATS = ("gguf", "hf", "compressed-tensors")


@app.command()
def export(path: str = typer.Argument(..., help="model: HF folder, GPTQ/AWQ/compressed-tensors folder, .gguf file "
                                                 "or zoo:smollm2"),
           fmt: str = typer.Option("gguf", "--format", "-f", help="gguf, hf (dense safetensors folder) or "
                                                                 "compressed-tensors"),
           gguf_type: str = typer.Option("f16", "--type", "-t", help="GGUF type: f16, q8_0, q4_0, q4_k_m"),
           pre: str = typer.Option(None, "--pre", help="llama.cpp pre-tokenizer name (tokenizer.ggml.pre); "
                                                       "found automatically for known vocabularies"),
           name: str = typer.Option(None, "--name", help="general.name in the GGUF (default: the folder name)"),
           quantizer: str = typer.Option("auto", "--quantizer",
                                         help="q4_k_m: auto (llama-quantize if found, else weightlab's "
                                              "K-quant packer), llama-quantize, weightlab"),
           dtype: str = typer.Option(None, "--dtype", help="hf: store floating tensors in this dtype"),
           out: str = typer.Option(..., "--out", "-o"), force: bool = typer.Option(False, "--force"),
           json_out: str = json_option("the report")) -> None:
    """Export a model for serving: one GGUF file for llama.cpp, or a dense Hugging Face folder."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown --format '{fmt}'; choose one of {', '.join(FORMATS)}")
    src = resolve_model(path)
    if fmt == "gguf":
        from ..io.gguf_export import export_gguf

        rep = export_gguf(src, Path(out), gguf_type, force=force, pre=pre, name=name, quantizer=quantizer).as_dict()
    elif fmt == "hf":
        from ..io.hf_export import export_hf

        rep = export_hf(src, Path(out), force=force, dtype=dtype)
    else:
        rep = _compressed_tensors()
    if emit_json(rep, json_out):
        return
    console.print(f"wrote {rep['path']}")
    for k, v in rep.items():
        if k != "path" and v not in (None, [], {}):
            console.print(f"  {k}: {v}")


def _compressed_tensors() -> dict:
    # Writing compressed-tensors belongs to weightlab.compress.deploy (built separately); it needs
    # weightlab's own quantization results, which `weightlab quantize` produces, not a plain folder.
    try:
        from ..compress import deploy  # noqa: F401
    except ImportError:
        raise ConfigError("--format compressed-tensors is not available in this build "
                          "(weightlab.compress.deploy is missing)") from None
    raise ConfigError("--format compressed-tensors is written by `weightlab quantize` from its own quantization "
                      "results (weightlab.compress.deploy); export cannot re-derive the codes from a dense folder")
