"""One job per verb: ``prune_job``, ``quantize_job``, ``compensate_job`` read a checkpoint and write one.

The CLI commands and the recipe steps both call these (the CLI only parses and prints), so a recipe
step gets everything the command has: sequential onloading for causal LMs (memory independent of
depth), the device policy, the deployment formats, before/after evaluation and the report file.
``log`` receives the human-readable lines (before/after quality); the return value is the report.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

from ..engine.evaluate import load_with_evaluator, model_kind
from .checks import check_finite, check_prune_request, check_quant_request
from ..errors import ConfigError, OutputExistsError
from ..io.atomic import check_not_input
from ..io.refs import load_text, resolve_model


def open_job(path, out, force: bool, *, llm_only: bool = False):
    """(source path, checkpoint, kind), with the output checks every job does before any work."""
    from ..io.reader import open_checkpoint

    src = resolve_model(str(path))
    check_not_input(Path(out), [src])
    if Path(out).exists() and not force:
        raise OutputExistsError(f"output '{out}' already exists; pass --force to replace it")
    ck = open_checkpoint(src)
    kind = model_kind(ck.config or {})
    if llm_only and kind == "zoo-mlp":
        raise ConfigError("quantize/compensate work on HF causal LMs and encoders")
    return src, ck, kind


def wants_sequential(flag: bool | None, kind: str, whole_only: bool) -> bool:
    """Explicit choice, else: causal LMs onload block by block unless the method needs the whole model."""
    if flag is not None:
        return flag
    return kind == "causal-lm" and not whole_only


def single_process_only(what: str = "--whole-model") -> None:
    """The in-memory path does not split work across processes: under torchrun every rank would compute
    the same thing and write the same folder. One clear error instead."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"{what} runs in one process; under torchrun/accelerate use the sequential path "
                          "(the default for causal LMs, or --sequential), which splits the calibration samples")


def is_main_rank() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def dev_dt(ck, device, dtype):
    from ..engine.device import device_policy
    from .sequential import checkpoint_dtype

    return device_policy(device, dtype, checkpoint_dtype(ck))


def streamed_eval(tok, eval_data: str, eval_tokens: int, device, dtype):
    """Perplexity of a checkpoint folder without loading it whole."""
    from ..engine.evaluate import streamed_perplexity

    text = load_text(eval_data, "heldout")

    def ev(folder):
        r = streamed_perplexity(folder, tok, text, max_tokens=eval_tokens, device=device, dtype=dtype)
        return {"perplexity": round(r["perplexity"], 3), "tokens": r["tokens"]}

    return ev


def run_sequential_job(verb, src, ck, kind, out, force, placement, kw, evaluation, report_name, log,
                       original=None, hessian=True, card: dict | None = None, extra: dict | None = None, **run_kw):
    """Run ``verb`` with sequential onloading; evaluate by streaming too; write the report (rank 0).
    Returns (report, result dict), or (None, None) on the other ranks."""
    from ..io.hf import load_tokenizer
    from ..io.provenance import Provenance
    from .sequential import run_sequential, write_report

    eval_data, eval_tokens, no_eval = evaluation
    tok = load_tokenizer(src)
    main = is_main_rank()
    ev = None if (no_eval or kind != "causal-lm" or not main) else streamed_eval(
        tok, eval_data, eval_tokens, *dev_dt(ck, placement.device, placement.dtype))
    before = ev(src) if ev else None
    if before:
        log(f"before: {before}")
    prov = Provenance(method=f"compress/{verb}/{kw['method']}", params=kw,
                      inputs=[str(src)] + ([str(original)] if original else []))
    if card:
        prov.card = card
    rep, info = run_sequential(verb, src, out, task=kind, force=force, tokenizer=tok, provenance=prov,
                               placement=placement, original=original, hessian=hessian, **run_kw, **kw)
    if not main:
        return None, None
    after = ev(out) if ev else None
    if after:
        log(f"after:  {after}")
    result = {**rep.as_dict(), "params": kw, "before": before, "after": after, **info, **(extra or {})}
    write_report(out, report_name, result)
    return rep, result


def _placement(device, dtype, offload_activations, max_memory):
    from .sequential import Placement

    return Placement(device=device, dtype=dtype, offload_activations=offload_activations, max_memory=max_memory)


def _seq_prune_card(sparsity, pattern, kind) -> dict:
    """The card of a sequential run is written with the shards, before the run ends: uniform rules prune
    exactly the target share of every layer, so the target is the sparsity the model will have."""
    from .cards import sparsity_card

    card = sparsity_card(sparsity, pattern)
    if kind == "causal-lm":
        card.update(library_name="transformers", pipeline_tag="text-generation")
    return card


def _quiet(msg: str) -> None:
    pass


def step_placement(cfg) -> dict:
    return dict(device=cfg.device, dtype=cfg.dtype, sequential=cfg.sequential,
                offload_activations=cfg.offload_activations, max_memory=cfg.max_memory)


def prune_job(path, out, method: str = "wanda", sparsity: float | None = None, *, pattern: str | None = None,
              allocation: str = "uniform", calib: str = "wiki", nsamples: int = 32, seqlen: int = 512, seed: int = 0,
              sampling: str = "random", eval_data: str = "wiki", eval_tokens: int = 16384, no_eval: bool = False,
              params: dict | None = None, fmt: str = "hf", device: str = "auto", dtype: str = "auto",
              sequential: bool | None = None, offload_activations: bool = False, max_memory: str | None = None,
              force: bool = False, log: Callable[[str], None] = _quiet):
    """Prune the checkpoint at ``path`` into ``out``; returns (PruneReport, result dict) (None on other ranks)."""
    from ..engine.source import StateDictSource
    from ..engine.streaming import write_source
    from ..io.provenance import Provenance
    from ..registry import get_method
    from .cards import prune_card
    from .deploy import check_format
    from .prune import prune as do_prune

    check_format(fmt)
    params = dict(params or {})
    sparsity = check_prune_request(method, sparsity, pattern, allocation, params)
    src, ck, kind = open_job(path, out, force)
    check_finite(ck, src)
    spec = get_method("compress", method)
    needs = set(spec.contract.needs)
    whole_only = "gradients" in needs or spec.contract.prepare is not None or allocation == "rd"
    dev, dt = dev_dt(ck, device, dtype)
    if wants_sequential(sequential, kind, whole_only):
        if kind == "zoo-mlp":
            raise ConfigError("--sequential needs a Hugging Face model with a block list; zoo MLPs run whole")
        return run_sequential_job(
            "prune", src, ck, kind, out, force, _placement(device, dtype, offload_activations, max_memory),
            dict(method=method, sparsity=sparsity, pattern=pattern, allocation=allocation, calib=calib,
                 nsamples=nsamples, seqlen=seqlen, seed=seed, sampling=sampling, **params),
            (eval_data, eval_tokens, no_eval), "prune-report.json", log, hessian="hessian" in needs,
            card=_seq_prune_card(sparsity, pattern, kind), extra={"format": fmt})
    single_process_only()
    model, tok, evaluate = load_with_evaluator(kind, src, ck, eval_data, eval_tokens, no_eval, dtype=dt)
    before = evaluate(model) if evaluate else None
    if before:
        log(f"before: {before}")
    calib_arg = calib
    if kind == "zoo-mlp":
        from ..zoo import load_dataset

        calib_arg = load_dataset((ck.config or {}).get("dataset", "digits")).x_train[: nsamples * 16]
    rep = do_prune(model, method, sparsity, pattern=pattern, allocation=allocation, calib=calib_arg, tokenizer=tok,
                   nsamples=nsamples, seqlen=seqlen, seed=seed, sampling=sampling, device=dev,
                   offload_activations=offload_activations, **params)
    after = evaluate(model) if evaluate else None
    if after:
        log(f"after:  {after}")
    sd = model.state_dict()
    # tensors the loaded model does not hold (non-persistent buffers such as position_ids) are unchanged
    pruned = {n: sd[n].to(ck.info(n).dtype) if n in sd else ck.get(n) for n in ck.names()}
    result = {**rep.as_dict(), "before": before, "after": after, "format": fmt, "device": str(dev),
              "sequential": False}
    prov = Provenance(method=f"compress/prune/{rep.method}", params={k: v for k, v in result.items() if k != "layers"},
                      inputs=[str(src)], card=prune_card(model, rep.layers, kind == "causal-lm"))
    write_source(StateDictSource(pruned, ck.config, ck.path), out, provenance=prov, inputs=[src], force=force,
                 extra_files={"prune-report.json": json.dumps(result, indent=1)})
    return rep, result


def quantize_job(path, out, method: str = "gptq", bits: int | None = None, group_size: int = 128, *,
                 sym: bool | None = None, keep_zeros: bool = True, calib: str = "wiki", nsamples: int = 32,
                 seqlen: int = 512, seed: int = 0, sampling: str = "random", eval_data: str = "wiki", eval_tokens: int = 16384,
                 no_eval: bool = False, fmt: str = "compressed-tensors", packed: str | None = None,
                 params: dict | None = None, device: str = "auto", dtype: str = "auto",
                 sequential: bool | None = None, offload_activations: bool = False, max_memory: str | None = None,
                 force: bool = False, log: Callable[[str], None] = _quiet, warn: Callable[[str], None] = _quiet,
                 activations: str = "none", observer: str = "static_minmax", kv_cache: bool = False):
    """Quantize the checkpoint at ``path`` into ``out`` (compressed-tensors by default, or dequantized hf);
    returns (QuantReport, result dict) (None on other ranks). ``activations``/``observer``/``kv_cache``: W8A8 and
    FP8 activation and KV-cache quantization (compress/activations.py), compressed-tensors only."""
    from ..engine.source import StateDictSource
    from ..engine.streaming import write_source
    from ..io.provenance import Provenance
    from ..registry import get_method
    from . import cards, deploy
    from .prune import target_layers
    from .quantize import dequantized_state_dict, quantize as do_quantize, save_quantized_packed

    params = dict(params or {})
    ct = deploy.check_format(fmt) == "compressed-tensors"
    sym = ct if sym is None else sym
    bits_eff = check_quant_request(method, bits, group_size, params)
    spec = get_method("compress", method)
    from .activations import ActScheme

    act = ActScheme(activations, observer, "float" if spec.name == "fp8" else "int", kv_cache)
    if act.active and not ct:
        raise ConfigError("activation and KV-cache scales are stored only in compressed-tensors checkpoints; use "
                          "--format compressed-tensors, or --activations none without --kv-cache")
    if act.inputs != "none" and bits_eff != 8:
        raise ConfigError(f"quantized activations (W8A8, FP8) take 8-bit weights; got {bits_eff} bits: pass --bits 8")
    akw = dict(activations=activations, observer=observer, kv_cache=kv_cache) if act.active else {}
    if ct:  # the cheap refusals first, before loading the model
        deploy.check_request(method, bits_eff, group_size, params)
    src, ck, kind = open_job(path, out, force, llm_only=True)
    check_finite(ck, src)
    from .quantize import quant_needs

    needs = quant_needs(spec, spec.make_config(params))
    hessian = "hessian" in needs
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
                  target_layers(load_with_evaluator(kind, src, ck, no_eval=True)[0]))
        deploy.check_request(method, bits_eff, group_size, params, deploy.linear_in_features(layers))
        del skeleton
        # CT stores scales in the checkpoint's dtype; fit them in it exactly (bf16 models: bf16 scales)
        # (float32 models: float16 scales for pack-quantized, as before; W8A8/FP8 keep float32 as llm-compressor)
        scale_dtype = {"bfloat16": "bfloat16", "float16": "float16"}.get(
            str(ck.info(f"{next(iter(layers))}.weight").dtype).removeprefix("torch."),
            "float32" if act.active or spec.name == "fp8" else "float16")
        if not sym:
            warn(deploy.ASYM_WARNING)
    if seq:
        from .deploy_sequential import sequential_writer

        return run_sequential_job(
            "quantize", src, ck, kind, out, force, _placement(device, dtype, offload_activations, max_memory),
            dict(method=method, bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype, calib=calib,
                 nsamples=nsamples, seqlen=seqlen, seed=seed, sampling=sampling, keep_zeros=keep_zeros, **params,
                 **akw),
            (eval_data, eval_tokens, no_eval), "quantize-report.json", log, hessian=hessian,
            extra={"format": fmt, "sym": sym, "scale_dtype": scale_dtype,
                   **({"after_note": "weights only: the streamed evaluation does not quantize activations"}
                      if act.inputs != "none" else {})},
            data=hessian or "block" in needs or act.calibrates,
            **(sequential_writer(ck, act if act.active else None) if ct else {}))
    single_process_only()
    dev, dt = dev_dt(ck, device, dtype)
    model, tok, evaluate = load_with_evaluator(kind, src, ck, eval_data, eval_tokens, no_eval, dtype=dt)
    before = evaluate(model) if evaluate else None
    if before:
        log(f"before: {before}")
    rep = do_quantize(model, method, bits, group_size, sym=sym, scale_dtype=scale_dtype, calib=calib, tokenizer=tok,
                      nsamples=nsamples, seqlen=seqlen, seed=seed, sampling=sampling, device=dev,
                      offload_activations=offload_activations, keep_zeros=keep_zeros, **params, **akw)
    if evaluate and rep.act is not None:  # W8A8/FP8: evaluated with its activations (and KV cache) quantized
        from .activations import fake_quant

        with fake_quant(model, rep.quantized, rep.act):
            after = evaluate(model)
    else:
        after = evaluate(model) if evaluate else None
    if after:
        log(f"after:  {after}")
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
                                              extra_files=report_file, inputs=[src], act=rep.act)
        result["bits_per_weight_on_disk"] = summ["bits_per_weight"]
        result["written_as"] = f"compressed-tensors {summ['scheme']}"
    else:
        prov.card = cards.hf_quant_card(rep, sym)
        write_source(StateDictSource(dequantized_state_dict(model, ck), ck.config, ck.path), out, provenance=prov,
                     inputs=[src], force=force, extra_files=report_file)
        result["bits_per_weight_on_disk"] = rep.bits_per_weight
        result["written_as"] = "dequantized hf weights (full size; the bits are what packing would take)"
    return rep, result


def compensate_job(path, out, original, method: str = "eora", rank: int = 16, *, calib: str = "wiki",
                   nsamples: int = 32, seqlen: int = 512, seed: int = 0, sampling: str = "random", adapter: bool = False, fmt: str = "hf",
                   eval_data: str = "wiki", eval_tokens: int = 16384, no_eval: bool = False, device: str = "auto",
                   dtype: str = "auto", sequential: bool | None = None, offload_activations: bool = False,
                   max_memory: str | None = None, force: bool = False, log: Callable[[str], None] = _quiet):
    """Add rank-r EoRA/SVD corrections of the compressed model at ``path`` against ``original``; returns
    (CompensateReport, result dict) (None on other ranks)."""
    from ..engine.source import StateDictSource
    from ..engine.streaming import write_source
    from ..io.provenance import Provenance
    from ..io.reader import open_checkpoint
    from .compensate import apply_adapters, compensate as do_compensate, save_peft_adapter
    from .deploy import check_format
    from .quantize import dequantized_state_dict

    if check_format(fmt) == "compressed-tensors" and not adapter:
        raise ConfigError("merged EoRA/SVD corrections move the weights off the integer grid, so they cannot be "
                          "stored as compressed-tensors; use --format hf (merged, dense) or --adapter (a LoRA "
                          "adapter beside the quantized model)")
    src, ck, kind = open_job(path, out, force, llm_only=True)
    check_finite(ck, src)
    osrc = resolve_model(str(original))
    check_not_input(Path(out), [osrc])
    if wants_sequential(sequential, kind, whole_only=adapter):
        return run_sequential_job(
            "compensate", src, ck, kind, out, force, _placement(device, dtype, offload_activations, max_memory),
            dict(method=method, rank=rank, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, sampling=sampling),
            (eval_data, eval_tokens, no_eval), "compensate-report.json", log, original=osrc,
            hessian=method == "eora", extra={"format": fmt, "original": osrc.name})
    single_process_only()
    dev, dt = dev_dt(ck, device, dtype)
    model, tok, evaluate = load_with_evaluator(kind, src, ck, eval_data, eval_tokens, no_eval, dtype=dt)
    ock = open_checkpoint(osrc)
    orig = copy.deepcopy(model)
    orig.load_state_dict({n: ock.get(n).to(t.dtype) for n, t in orig.state_dict().items() if n in ock}, strict=False)
    before = evaluate(model) if evaluate else None
    if before:
        log(f"before: {before}")
    rep = do_compensate(model, orig, method, rank, merge=not adapter, calib=calib, tokenizer=tok, nsamples=nsamples,
                        seqlen=seqlen, seed=seed, sampling=sampling, device=dev,
                        offload_activations=offload_activations)
    del orig
    after = None
    if evaluate:
        if adapter:
            tmp = copy.deepcopy(model)
            apply_adapters(tmp, rep.adapters)
            after = evaluate(tmp)
            del tmp
        else:
            after = evaluate(model)
        log(f"after:  {after}")
    result = {**rep.as_dict(), "before": before, "after": after, "original": osrc.name}
    if adapter:
        save_peft_adapter(out, rep.adapters, base_model=str(src), rank=rank,
                          task_type="CAUSAL_LM" if kind == "causal-lm" else "FEATURE_EXTRACTION",
                          force=force, inputs=[src, osrc],
                          extra_files={"compensate-report.json": json.dumps(result, indent=1)})
    else:
        prov = Provenance(method=f"compress/compensate/{method}",
                          params={k: v for k, v in result.items() if k != "layers"}, inputs=[str(src), str(osrc)])
        write_source(StateDictSource(dequantized_state_dict(model, ck), ck.config, ck.path), out, provenance=prov,
                     inputs=[src, osrc], force=force,
                     extra_files={"compensate-report.json": json.dumps(result, indent=1)})
    return rep, result
