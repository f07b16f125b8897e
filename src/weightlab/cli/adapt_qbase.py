"""Adapters on a 4-bit compressed-tensors base: ``weightlab tune``'s base loading and ``weightlab adapter fold``."""
from __future__ import annotations

import tempfile
from pathlib import Path

import typer

from ..errors import ConfigError
from ._common import console, device_option, emit_json, json_option
from .adapt import adapter_app


def load_tune_base(src, dequantize_base: bool):
    """(model, tokenizer, note) for ``weightlab tune``: a symmetric pack-quantized compressed-tensors folder
    keeps its packed Linears (QLoRA-style) unless ``dequantize_base``; any other model loads dense in fp32."""
    from ..io.hf import load_causal_lm
    from ..io.quantized_linear import is_compressed_tensors

    if dequantize_base or not is_compressed_tensors(src):
        model, tok = load_causal_lm(src)
        return model, tok, None
    from ..adapt.qbase import load_base, memory_report

    model, tok = load_base(src)
    mem = memory_report(model)
    note = (f"4-bit base: {mem['quantized_layers']} packed Linears, {mem['bits_per_weight']:.3f} bits/weight "
            f"({mem['bytes'] / 2**20:.1f} MiB, {mem['ratio_fp32']:.3f} of fp32); OUT/merged is re-quantized "
            "(RTN), 'weightlab adapter fold OUT/adapter --base BASE' writes a dense fold")
    return model, tok, note


@adapter_app.command("fold")
def fold(adapter: str = typer.Argument(..., help="weightlab adapter folder trained on BASE"),
         base: str = typer.Option(..., "--base", help="the compressed-tensors (pack-quantized) base folder"),
         requantize: str = typer.Option(None, "--requantize", help="rtn: compressed-tensors in the base's scheme "
                                        "(unchanged groups keep their codes); rtn-keep-scales: the base's scales "
                                        "too (a code moves only where its weight moved by more than half a step); "
                                        "gptq: compressed-tensors through "
                                        "GPTQ on --calib; default: a dense (dequantized) HF folder"),
         dtype: str = typer.Option(None, "--dtype", help="dense fold's weights: bfloat16, float16, float32 "
                                                         "(default: the base's scale dtype)"),
         calib: str = typer.Option("wiki", "--calib", help="GPTQ calibration text"),
         nsamples: int = typer.Option(32, "--nsamples"), seqlen: int = typer.Option(512, "--seqlen"),
         seed: int = typer.Option(0, "--seed"), device: str = device_option(),
         out: str = typer.Option(..., "--out", "-o"), force: bool = typer.Option(False, "--force"),
         json_out: str = json_option("the fold report")) -> None:
    """Fold an adapter trained on a 4-bit compressed-tensors base: dense, or re-quantized (RTN or GPTQ)."""
    from ..adapt.qbase import fold_job

    if requantize not in (None, "rtn", "rtn-keep-scales", "gptq"):
        raise ConfigError(f"--requantize {requantize!r}: choose rtn, rtn-keep-scales or gptq (or leave it out for a "
                          "dense fold)")
    if requantize != "gptq":
        rep = fold_job(adapter, base, out, requantize=requantize, dtype=dtype, force=force)
    else:
        rep = _fold_gptq(adapter, base, out, dtype, calib, nsamples, seqlen, seed, device, force)
    if emit_json(rep, json_out):
        return
    what = {"hf": f"dense {rep.get('dtype', '')}", "compressed-tensors": f"re-quantized ({requantize})"}[rep["format"]]
    console.print(f"[green]folded[/] {rep['method']} ({rep['layers']} layers) into {base}: {what} "
                  f"in {rep['seconds']:.1f} s -> {out}", highlight=False)


def _fold_gptq(adapter, base, out, dtype, calib, nsamples, seqlen, seed, device, force) -> dict:
    """Dense fold into a hidden folder beside OUT, then the GPTQ quantize job (the base's bits and group size)."""
    import time

    from ..adapt.qbase import base_scheme, fold_job
    from ..compress.jobs import quantize_job
    from ..io.atomic import check_not_input

    t0 = time.perf_counter()
    b, args = base_scheme(base)
    o = Path(out).expanduser()
    check_not_input(o, [Path(adapter), b])
    group = int(args.get("group_size") or -1) if args.get("strategy") == "group" else -1
    o.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=o.parent, prefix=f".{o.name}.dense-") as tmp:
        dense = Path(tmp) / "dense"
        rep = fold_job(adapter, base, dense, dtype=dtype)  # the base's dtype: GPTQ scales as the base's
        quantize_job(dense, out, "gptq", int(args["num_bits"]), group, sym=True, calib=calib, nsamples=nsamples,
                     seqlen=seqlen, seed=seed, no_eval=True, fmt="compressed-tensors", device=device, force=force)
    rep.update(format="compressed-tensors", requantize="gptq", seconds=round(time.perf_counter() - t0, 2))
    rep.pop("dtype", None)
    return rep
