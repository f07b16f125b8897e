from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import ConfigError, OutputExistsError
from ..io.atomic import check_not_input
from ..io.refs import resolve_model
from . import app
from ._common import console, err_console
from ._compress import dev_dt, placement_options, run_sequential_cli, single_process_only, wants_sequential
from .prune import _kind, _load

_DEV, _DT, _SEQ, _OFF, _MAXMEM = placement_options()


def _params(items) -> dict:
    import yaml

    out = {}
    for kv in items or []:
        k, sep, v = kv.partition("=")
        if not sep:
            raise ConfigError(f"--param expects KEY=VALUE, got {kv!r}")
        out[k] = yaml.safe_load(v)
    return out


def _open(path, out, force):
    from ..io.reader import open_checkpoint

    src = resolve_model(path)
    check_not_input(Path(out), [src])
    if Path(out).exists() and not force:
        raise OutputExistsError(f"output '{out}' already exists; pass --force to replace it")
    ck = open_checkpoint(src)
    kind = _kind(ck.config or {})
    if kind == "zoo-mlp":
        raise ConfigError("quantize/compensate work on HF causal LMs and encoders")
    return src, ck, kind


@app.command()
def quantize(path: str = typer.Argument(..., help="model folder (HF causal LM or encoder)"),
             method: str = typer.Option("gptq", "--method", "-m", help="rtn, gptq, pbllm, statsq"),
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
             device: str = _DEV, dtype: str = _DT, sequential: bool = _SEQ, offload_activations: bool = _OFF,
             max_memory: str = _MAXMEM,
             out: str = typer.Option(..., "--out", "-o"), force: bool = typer.Option(False, "--force")) -> None:
    """Quantize a model; write it as compressed-tensors (default) or as a dequantized HF folder."""
    from ..compress import deploy
    from ..compress.prune import target_layers
    from ..compress.quantize import dequantized_state_dict, quantize as do_quantize, save_quantized_packed
    from ..engine.source import StateDictSource
    from ..engine.streaming import write_source
    from ..io.provenance import Provenance
    from ..registry import get_method

    params = _params(param)
    if salient is not None:
        params["salient"] = salient
    ct = deploy.check_format(fmt) == "compressed-tensors"
    if sym is None:
        sym = ct
    bits_eff = bits if bits is not None else get_method("compress", method).extra.get("default_bits", 4)
    if ct:  # the cheap refusals first, before loading the model
        deploy.check_request(method, bits_eff, group_size, params)
    src, ck, kind = _open(path, out, force)
    spec = get_method("compress", method)
    cfg_needs = spec.extra.get("needs", ())
    hessian = "hessian" in set(cfg_needs(spec.make_config(params)) if callable(cfg_needs) else cfg_needs)
    seq = wants_sequential(sequential, kind, whole_only=bool(packed))
    if packed and seq:
        raise ConfigError("--packed holds every layer's codes in memory; use it with --whole-model")
    if packed:
        check_not_input(Path(packed), [src])
    scale_dtype = "float16"
    if ct:
        from ..engine.onload import OnloadedModel

        skeleton = OnloadedModel(src, kind) if seq else None  # only shapes are read: the blocks stay on meta
        layers = (target_layers(skeleton.model, (skeleton.blocks_name, skeleton.blocks)) if seq else
                  target_layers(_load(kind, src, ck, eval_data, eval_tokens, True)[0]))
        deploy.check_request(method, bits_eff, group_size, params, deploy.linear_in_features(layers))
        del skeleton
        # CT stores scales in the checkpoint's dtype; fit them in it exactly (bf16 models: bf16 scales)
        scale_dtype = {"bfloat16": "bfloat16", "float16": "float16"}.get(
            str(ck.info(f"{next(iter(layers))}.weight").dtype).removeprefix("torch."), "float16")
        if not sym:
            err_console.print(f"[bold yellow]warning:[/] {deploy.ASYM_WARNING}", highlight=False)
    if seq:
        from ..compress.deploy_sequential import sequential_writer

        placement = (device, dtype, offload_activations, max_memory)
        rep = run_sequential_cli("quantize", src, ck, kind, out, force, placement,
                                 dict(method=method, bits=bits, group_size=group_size, sym=sym,
                                      scale_dtype=scale_dtype, calib=calib, nsamples=nsamples, seqlen=seqlen,
                                      seed=seed, keep_zeros=keep_zeros, **params),
                                 (eval_data, eval_tokens, no_eval), "quantize-report.json", hessian=hessian,
                                 extra={"format": fmt, "sym": sym, "scale_dtype": scale_dtype},
                                 **(sequential_writer(ck) if ct else {}))
        if rep is not None:
            console.print(f"[green]quantized[/] {len(rep.layers)} layers with {rep.method} ({rep.bits} bits, group "
                          f"{rep.group_size}, {'sym' if sym else 'asym'}) in {rep.seconds:.1f} s -> {out} ({fmt})")
        return
    single_process_only()
    dev, dt = dev_dt(ck, device, dtype)
    model, tok, evaluate = _load(kind, src, ck, eval_data, eval_tokens, no_eval, dtype=dt)
    before = evaluate(model) if evaluate else None
    if before:
        console.print(f"before: {before}")
    rep = do_quantize(model, method, bits, group_size, sym=sym, scale_dtype=scale_dtype, calib=calib, tokenizer=tok,
                      nsamples=nsamples, seqlen=seqlen, seed=seed, device=dev,
                      offload_activations=offload_activations, keep_zeros=keep_zeros, **params)
    after = evaluate(model) if evaluate else None
    if after:
        console.print(f"after:  {after}")
    result = {**rep.as_dict(), "sym": sym, "scale_dtype": scale_dtype, "params": params, "before": before,
              "after": after, "format": fmt}
    prov = Provenance(method=f"compress/quantize/{rep.method}",
                      params={k: v for k, v in result.items() if k != "layers"}, inputs=[str(src)])
    if packed:  # before the compressed-tensors writer, which consumes the model
        save_quantized_packed(packed, rep, model, ck, provenance=Provenance(prov.method, prov.params, prov.inputs),
                              force=force)
    report_file = {"quantize-report.json": json.dumps(result, indent=1)}
    if ct:
        summ = deploy.save_compressed_tensors(out, rep.quantized, model, ck, provenance=prov, force=force,
                                              extra_files=report_file, inputs=[src])
        bpw, what = summ["bits_per_weight"], f"compressed-tensors {summ['scheme']}"
    else:
        prov.card = deploy.hf_quant_card(rep, sym)
        write_source(StateDictSource(dequantized_state_dict(model, ck), ck.config, ck.path), out, provenance=prov,
                     inputs=[src], force=force, extra_files=report_file)
        bpw, what = rep.bits_per_weight, "dequantized hf weights (full size; the bits are what packing would take)"
    console.print(f"[green]quantized[/] {len(rep.layers)} layers with {rep.method} ({rep.bits} bits, group "
                  f"{rep.group_size}, {'sym' if sym else 'asym'}): {bpw:.3f} bits/weight incl. scales in "
                  f"{rep.seconds:.1f} s -> {out} ({what})" + (f" (packed: {packed})" if packed else ""))


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
    import copy

    from ..compress.compensate import compensate as do_compensate, save_peft_adapter
    from ..compress.quantize import dequantized_state_dict
    from ..engine.source import StateDictSource
    from ..engine.streaming import write_source
    from ..io.provenance import Provenance
    from ..compress.deploy import check_format
    from ..io.reader import open_checkpoint

    if check_format(fmt) == "compressed-tensors" and not adapter:
        raise ConfigError("merged EoRA/SVD corrections move the weights off the integer grid, so they cannot be "
                          "stored as compressed-tensors; use --format hf (merged, dense) or --adapter (a LoRA "
                          "adapter beside the quantized model)")
    src, ck, kind = _open(path, out, force)
    if wants_sequential(sequential, kind, whole_only=adapter):
        osrc = resolve_model(original)
        check_not_input(Path(out), [osrc])
        placement = (device, dtype, offload_activations, max_memory)
        rep = run_sequential_cli("compensate", src, ck, kind, out, force, placement,
                                 dict(method=method, rank=rank, calib=calib, nsamples=nsamples, seqlen=seqlen,
                                      seed=seed),
                                 (eval_data, eval_tokens, no_eval), "compensate-report.json", original=osrc,
                                 hessian=method == "eora", extra={"format": fmt, "original": osrc.name})
        if rep is not None:
            console.print(f"[green]compensated[/] {len(rep.layers)} layers with {method} rank {rank} in "
                          f"{rep.seconds:.1f} s -> {out}")
        return
    single_process_only()
    dev, dt = dev_dt(ck, device, dtype)
    model, tok, evaluate = _load(kind, src, ck, eval_data, eval_tokens, no_eval, dtype=dt)
    osrc = resolve_model(original)
    ock = open_checkpoint(osrc)
    orig = copy.deepcopy(model)
    orig.load_state_dict({n: ock.get(n).to(t.dtype) for n, t in orig.state_dict().items() if n in ock}, strict=False)
    before = evaluate(model) if evaluate else None
    if before:
        console.print(f"before: {before}")
    rep = do_compensate(model, orig, method, rank, merge=not adapter, calib=calib, tokenizer=tok, nsamples=nsamples,
                        seqlen=seqlen, seed=seed, device=dev, offload_activations=offload_activations)
    del orig
    after = None
    if evaluate:
        if adapter:
            from ..compress.compensate import apply_adapters

            tmp = copy.deepcopy(model)
            apply_adapters(tmp, rep.adapters)
            after = evaluate(tmp)
            del tmp
        else:
            after = evaluate(model)
        console.print(f"after:  {after}")
    result = {**rep.as_dict(), "before": before, "after": after, "original": osrc.name}
    if adapter:
        save_peft_adapter(out, rep.adapters, base_model=str(src), rank=rank,
                          task_type="CAUSAL_LM" if _kind(ck.config or {}) == "causal-lm" else "FEATURE_EXTRACTION",
                          force=force, inputs=[src, osrc],
                          extra_files={"compensate-report.json": json.dumps(result, indent=1)})
    else:
        prov = Provenance(method=f"compress/compensate/{method}",
                          params={k: v for k, v in result.items() if k != "layers"}, inputs=[str(src), str(osrc)])
        write_source(StateDictSource(dequantized_state_dict(model, ck), ck.config, ck.path), out, provenance=prov,
                     inputs=[src, osrc], force=force,
                     extra_files={"compensate-report.json": json.dumps(result, indent=1)})
    console.print(f"[green]compensated[/] {len(rep.layers)} layers with {method} rank {rank} in {rep.seconds:.1f} s "
                  f"-> {out}{' (PEFT LoRA adapter)' if adapter else ''}")
