from __future__ import annotations

import typer

from . import app
from ._common import console, err_console
from ._compress import parse_params, placement_options

_DEV, _DT, _SEQ, _OFF, _MAXMEM = placement_options()

# llm-compressor's preset names -> (method or None = -m's, bits, group size, activations, method params)
SCHEMES = {"W8A8": (None, 8, -1, "dynamic", {}), "W8A8_STATIC": (None, 8, -1, "static", {}),
           "FP8": ("fp8", 8, -1, "static", {"strategy": "tensor"}),
           "FP8_DYNAMIC": ("fp8", 8, -1, "dynamic", {"strategy": "channel"})}


@app.command()
def quantize(path: str = typer.Argument(..., help="model folder (HF causal LM or encoder)"),
             method: str = typer.Option(None, "--method", "-m", help="rtn, gptq (default), awq, smoothquant, fp8, "
                                        "pbllm, statsq"),
             bits: int = typer.Option(None, "--bits", "-b", help="bits per weight (default: the method's)"),
             group_size: int = typer.Option(128, "--group-size", "-g", help="columns per group; -1 = per channel"),
             sym: bool = typer.Option(None, "--sym/--asym", help="symmetric grid (RTN/GPTQ); default: symmetric "
                                      "for compressed-tensors (what vLLM serves), asymmetric for hf"),
             keep_zeros: bool = typer.Option(True, "--keep-zeros/--no-keep-zeros",
                                             help="weights that are exactly 0 (a pruned model) stay exactly 0"),
             salient: float = typer.Option(None, "--salient", help="PB-LLM salient fraction (default 0.1)"),
             calib: str = typer.Option("wiki", "--calib"), nsamples: int = typer.Option(32, "--nsamples"),
             seqlen: int = typer.Option(512, "--seqlen"), seed: int = typer.Option(0, "--seed"),
             eval_data: str = typer.Option("wiki", "--eval"), eval_tokens: int = typer.Option(16384, "--eval-tokens"),
             no_eval: bool = typer.Option(False, "--no-eval"),
             fmt: str = typer.Option("compressed-tensors", "--format", "-f",
                                     help="compressed-tensors (packed 4/8-bit for transformers and vLLM) or hf "
                                          "(dequantized weights, full size)"),
             packed: str = typer.Option(None, "--packed", help="also write weightlab's private packed format here "
                                        "(not loadable by transformers)"),
             param: list[str] = typer.Option(None, "--param", "-p", help="method parameter KEY=VALUE"),
             scheme: str = typer.Option(None, "--scheme", help="llm-compressor preset: W8A8 (int8 channel weights, "
                                        "dynamic per-token int8 inputs), W8A8_STATIC, FP8 (-m fp8, tensor weights, "
                                        "static inputs), FP8_DYNAMIC; sets --bits, --group-size and --activations"),
             activations: str = typer.Option(None, "--activations", help="none (weight-only, default), dynamic "
                                             "(per-token scales at run time) or static (per-tensor, calibrated)"),
             observer: str = typer.Option("static_minmax", "--observer", help="static scales: static_minmax (max |x| "
                                          "over the calibration set) or minmax (llm-compressor's moving average)"),
             kv_cache: bool = typer.Option(False, "--kv-cache/--no-kv-cache", help="FP8 KV cache with calibrated "
                                           "per-tensor k/v scales (vLLM's kv_cache_scheme)"),
             device: str = _DEV, dtype: str = _DT, sequential: bool = _SEQ, offload_activations: bool = _OFF,
             max_memory: str = _MAXMEM,
             out: str = typer.Option(..., "--out", "-o"), force: bool = typer.Option(False, "--force")) -> None:
    """Quantize a model; write it as compressed-tensors (default) or as a dequantized HF folder."""
    from ..compress.jobs import quantize_job

    params = parse_params(param)
    if salient is not None:
        params["salient"] = salient
    if scheme is not None:
        from ..errors import ConfigError

        key = scheme.upper()
        if key not in SCHEMES:
            raise ConfigError(f"unknown scheme {scheme!r}; one of {', '.join(SCHEMES)}")
        s_method, s_bits, group_size, s_act, s_params = SCHEMES[key]
        if bits not in (None, s_bits):
            raise ConfigError(f"--scheme {key} has {s_bits}-bit weights, not {bits}")
        bits = s_bits
        if s_method and method not in (None, s_method):
            raise ConfigError(f"--scheme {key} quantizes weights with {s_method}, not {method}")
        method = s_method or method
        activations = activations or s_act
        params = {**s_params, **params}
    method = method or "gptq"
    rep, result = quantize_job(
        path, out, method, bits, group_size, sym=sym, keep_zeros=keep_zeros, calib=calib, nsamples=nsamples,
        seqlen=seqlen, seed=seed, eval_data=eval_data, eval_tokens=eval_tokens, no_eval=no_eval, fmt=fmt,
        packed=packed, params=params, device=device, dtype=dtype, sequential=sequential,
        offload_activations=offload_activations, max_memory=max_memory, force=force, log=console.print,
        activations=activations or "none", observer=observer, kv_cache=kv_cache,
        warn=lambda m: err_console.print(f"[bold yellow]warning:[/] {m}", highlight=False))
    if rep is None:
        return
    if rep.transforms:
        from ..compress.awq import describe as awq_describe
        from ..compress.smoothquant import describe as sq_describe

        console.print((sq_describe if rep.method == "smoothquant" else awq_describe)(rep.transforms))
    sym_s = "sym" if result["sym"] else "asym"
    if "written_as" not in result:  # sequential: written block by block
        console.print(f"[green]quantized[/] {len(rep.layers)} layers with {rep.method} ({rep.bits} bits, group "
                      f"{rep.group_size}, {sym_s}) in {rep.seconds:.1f} s -> {out} ({fmt})")
        return
    console.print(f"[green]quantized[/] {len(rep.layers)} layers with {rep.method} ({rep.bits} bits, group "
                  f"{rep.group_size}, {sym_s}): {result['bits_per_weight_on_disk']:.3f} bits/weight incl. scales in "
                  f"{rep.seconds:.1f} s -> {out} ({result['written_as']})" + (f" (packed: {packed})" if packed else ""))


@app.command()
def compensate(path: str = typer.Argument(..., help="the compressed model folder"),
               original: str = typer.Option(..., "--original", help="the uncompressed model folder"),
               method: str = typer.Option("eora", "--method", "-m", help="eora or svd"),
               rank: int = typer.Option(16, "--rank", "-r"),
               calib: str = typer.Option("wiki", "--calib"), nsamples: int = typer.Option(32, "--nsamples"),
               seqlen: int = typer.Option(512, "--seqlen"), seed: int = typer.Option(0, "--seed"),
               adapter: bool = typer.Option(False, "--adapter", help="write a PEFT LoRA adapter instead of merging"),
               fmt: str = typer.Option("hf", "--format", "-f",
                                       help="hf (merged, dense) or compressed-tensors (only with --adapter: the "
                                            "merged corrections leave the quantization grid)"),
               eval_data: str = typer.Option("wiki", "--eval"), eval_tokens: int = typer.Option(16384, "--eval-tokens"),
               no_eval: bool = typer.Option(False, "--no-eval"),
               device: str = _DEV, dtype: str = _DT, sequential: bool = _SEQ, offload_activations: bool = _OFF,
               max_memory: str = _MAXMEM,
               out: str = typer.Option(..., "--out", "-o"), force: bool = typer.Option(False, "--force")) -> None:
    """Add rank-r EoRA (or plain SVD) corrections of a compressed model against its original."""
    from ..compress.jobs import compensate_job

    rep, _ = compensate_job(path, out, original, method, rank, calib=calib, nsamples=nsamples, seqlen=seqlen,
                            seed=seed, adapter=adapter, fmt=fmt, eval_data=eval_data, eval_tokens=eval_tokens,
                            no_eval=no_eval, device=device, dtype=dtype, sequential=sequential,
                            offload_activations=offload_activations, max_memory=max_memory, force=force,
                            log=console.print)
    if rep is not None:
        console.print(f"[green]compensated[/] {len(rep.layers)} layers with {method} rank {rank} in "
                      f"{rep.seconds:.1f} s -> {out}{' (PEFT LoRA adapter)' if adapter else ''}")
