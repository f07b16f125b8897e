"""What prune, quantize and compensate share: where they compute and whether the model is onloaded block by block."""
from __future__ import annotations

import typer

from ._common import device_option, dtype_option

SEQUENTIAL_HELP = ("onload one block at a time from the checkpoint (memory independent of depth); default for causal "
                   "LMs when the method allows it; --whole-model loads everything (RD allocation, GBLM, D-Pruner)")


def placement_options():
    """Typer options, in order: device, dtype, sequential, offload_activations, max_memory."""
    return (device_option(), dtype_option(),
            typer.Option(None, "--sequential/--whole-model", help=SEQUENTIAL_HELP),
            typer.Option(False, "--offload-activations",
                         help="keep the calibration activations on the CPU when they do not fit the device"),
            typer.Option(None, "--max-memory",
                         help="memory budget checked before any work: 8GB (host) or cpu=8GB,cuda:0=20GB"))


def wants_sequential(flag: bool | None, kind: str, whole_only: bool) -> bool:
    """--sequential / --whole-model, else: causal LMs onload unless the method needs the whole model."""
    if flag is not None:
        return flag
    return kind == "causal-lm" and not whole_only


def single_process_only(what: str = "--whole-model") -> None:
    """The in-memory path does not split work across processes: under torchrun every rank would compute
    the same thing and write the same folder. One clear error instead."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ..errors import ConfigError

        raise ConfigError(f"{what} runs in one process; under torchrun/accelerate use the sequential path "
                          "(the default for causal LMs, or --sequential), which splits the calibration samples")


def is_main_rank() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def streamed_eval(src, tok, eval_data: str, eval_tokens: int, device, dtype):
    """Perplexity of a checkpoint folder without loading it whole (rank 0 only)."""
    from ..io.refs import load_text
    from ..engine.evaluate import streamed_perplexity

    text = load_text(eval_data, "heldout")

    def ev(folder):
        r = streamed_perplexity(folder, tok, text, max_tokens=eval_tokens, device=device, dtype=dtype)
        return {"perplexity": round(r["perplexity"], 3), "tokens": r["tokens"]}

    return ev


def dev_dt(ck, device, dtype):
    from ..compress.sequential import checkpoint_dtype
    from ..engine.device import device_policy

    return device_policy(device, dtype, checkpoint_dtype(ck))


def run_sequential_cli(verb, src, ck, kind, out, force, placement_args, kw, eval_args, report_name, original=None,
                       hessian=True, card: dict | None = None, extra: dict | None = None, **run_kw):
    """Run ``verb`` with sequential onloading; evaluate by streaming too; write the report (rank 0)."""
    from ..compress.sequential import Placement, run_sequential, write_report
    from ..io.hf import load_tokenizer
    from ..io.provenance import Provenance
    from ._common import console

    device, dtype, offload, max_memory = placement_args
    eval_data, eval_tokens, no_eval = eval_args
    tok = load_tokenizer(src)
    main = is_main_rank()
    ev = None if (no_eval or kind != "causal-lm" or not main) else streamed_eval(
        src, tok, eval_data, eval_tokens, *dev_dt(ck, device, dtype))
    before = ev(src) if ev else None
    if before:
        console.print(f"before: {before}")
    prov = Provenance(method=f"compress/{verb}/{kw['method']}", params=kw,
                      inputs=[str(src)] + ([str(original)] if original else []))
    if card:
        prov.card = card
    rep, info = run_sequential(verb, src, out, task=kind, force=force, tokenizer=tok, provenance=prov,
                               placement=Placement(device=device, dtype=dtype, offload_activations=offload,
                                                   max_memory=max_memory),
                               original=original, hessian=hessian, **run_kw, **kw)
    if not main:
        return None
    after = ev(out) if ev else None
    if after:
        console.print(f"after:  {after}")
    result = {**rep.as_dict(), "params": kw, "before": before, "after": after, **info, **(extra or {})}
    write_report(out, report_name, result)
    return rep
