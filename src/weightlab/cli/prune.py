from __future__ import annotations

import copy
import json
from pathlib import Path

import typer

from ..errors import ConfigError, OutputExistsError
from ..io.atomic import check_not_input
from ..io.refs import resolve_model
from . import app
from ._common import console
from ._compress import dev_dt, placement_options, run_sequential_cli, single_process_only, wants_sequential


def _kind(config: dict) -> str:
    arch = (config.get("architectures") or [""])[0]
    if config.get("model_type") == "weightlab-zoo-mlp":
        return "zoo-mlp"
    return "causal-lm" if arch.endswith("ForCausalLM") else "encoder"


def _sentences(text: str, n: int = 200) -> list[str]:
    import re

    out = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 5]
    return out[:n]


_DEV, _DT, _SEQ, _OFF, _MAXMEM = placement_options()


@app.command()
def prune(path: str = typer.Argument(..., help="model folder (HF causal LM or encoder, or a zoo classifier folder)"),
          method: str = typer.Option("wanda", "--method", "-m", help="magnitude, wanda, sparsegpt, gblm, dpruner"),
          sparsity: float = typer.Option(0.5, "--sparsity", "-s"),
          pattern: str = typer.Option(None, "--pattern", help="N:M pattern, e.g. 2:4"),
          allocation: str = typer.Option("uniform", "--allocation", help="uniform, global, lamp, dimap, rd"),
          calib: str = typer.Option("wiki", "--calib", help="wiki or a .txt/.jsonl file"),
          nsamples: int = typer.Option(32, "--nsamples"), seqlen: int = typer.Option(512, "--seqlen"),
          seed: int = typer.Option(0, "--seed"),
          sampling: str = typer.Option("random", "--sampling", help="random (seeded) or consecutive windows"),
          eval_data: str = typer.Option("wiki", "--eval", help="wiki (held-out split) or a file"),
          eval_tokens: int = typer.Option(16384, "--eval-tokens"),
          no_eval: bool = typer.Option(False, "--no-eval", help="skip the before/after evaluation"),
          param: list[str] = typer.Option(None, "--param", "-p", help="rule parameter KEY=VALUE"),
          fmt: str = typer.Option("hf", "--format", "-f",
                                  help="hf or compressed-tensors; both are written dense (zeros kept: vLLM and "
                                       "compressed-tensors dropped their sparse formats) with the sparsity recorded "
                                       "in the model card and metadata"),
          device: str = _DEV, dtype: str = _DT, sequential: bool = _SEQ, offload_activations: bool = _OFF,
          max_memory: str = _MAXMEM,
          out: str = typer.Option(..., "--out", "-o"), force: bool = typer.Option(False, "--force")) -> None:
    """Prune a model and print its quality before and after (perplexity, similarity or accuracy)."""
    import yaml

    from ..compress.deploy import check_format, prune_card

    from ..compress import prune as do_prune
    from ..engine.source import StateDictSource
    from ..engine.streaming import write_source
    from ..io.provenance import Provenance
    from ..io.reader import open_checkpoint
    from ..registry import get_method

    check_format(fmt)
    src = resolve_model(path)
    check_not_input(Path(out), [src])
    if Path(out).exists() and not force:
        raise OutputExistsError(f"output '{out}' already exists; pass --force to replace it")
    params = {}
    for kv in param or []:
        k, _, v = kv.partition("=")
        if not _:
            raise ConfigError(f"--param expects KEY=VALUE, got {kv!r}")
        params[k] = yaml.safe_load(v)
    ck = open_checkpoint(src)
    kind = _kind(ck.config or {})
    spec = get_method("compress", method)
    needs = set(spec.extra.get("needs", ()))
    whole_only = "gradients" in needs or "prepare" in spec.extra or allocation == "rd"
    dev, dt = dev_dt(ck, device, dtype)
    if wants_sequential(sequential, kind, whole_only):
        if kind == "zoo-mlp":
            raise ConfigError("--sequential needs a Hugging Face model with a block list; zoo MLPs run whole")
        rep = run_sequential_cli("prune", src, ck, kind, out, force, (device, dtype, offload_activations, max_memory),
                                 dict(method=method, sparsity=sparsity, pattern=pattern, allocation=allocation,
                                      calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, sampling=sampling,
                                      **params),
                                 (eval_data, eval_tokens, no_eval), "prune-report.json", hessian="hessian" in needs,
                                 card=_seq_prune_card(sparsity, pattern, kind), extra={"format": fmt})
        if rep is not None:
            _done(rep, pattern, out)
        return
    single_process_only()
    model, tok, evaluate = _load(kind, src, ck, eval_data, eval_tokens, no_eval, dtype=dt)
    before = evaluate(model) if evaluate else None
    if before:
        console.print(f"before: {before}")
    calib_arg = calib
    if kind == "zoo-mlp":
        from ..zoo import load_dataset

        calib_arg = load_dataset((ck.config or {}).get("dataset", "digits")).x_train[: nsamples * 16]
    rep = do_prune(model, method, sparsity, pattern=pattern, allocation=allocation, calib=calib_arg, tokenizer=tok,
                   nsamples=nsamples, seqlen=seqlen, seed=seed, sampling=sampling, device=dev,
                   offload_activations=offload_activations, **params)
    after = evaluate(model) if evaluate else None
    if after:
        console.print(f"after:  {after}")
    sd = model.state_dict()
    # tensors the loaded model does not hold (non-persistent buffers such as position_ids) are unchanged
    pruned = {n: sd[n].to(ck.info(n).dtype) if n in sd else ck.get(n) for n in ck.names()}
    result = {**rep.as_dict(), "before": before, "after": after, "format": fmt, "device": str(dev),
              "sequential": False}
    prov = Provenance(method=f"compress/prune/{rep.method}", params={k: v for k, v in result.items() if k != "layers"},
                      inputs=[str(src)], card=prune_card(model, rep.layers, kind == "causal-lm"))
    write_source(StateDictSource(pruned, ck.config, ck.path), out, provenance=prov, inputs=[src], force=force,
                 extra_files={"prune-report.json": json.dumps(result, indent=1)})
    _done(rep, pattern, out)


def _seq_prune_card(sparsity, pattern, kind) -> dict:
    """The card of a sequential run is written with the shards, before the run ends: uniform rules prune
    exactly the target share of every layer, so the target is the sparsity the model will have."""
    from ..compress.deploy import sparsity_card

    card = sparsity_card(0.5 if pattern == "2:4" else sparsity, pattern)
    if kind == "causal-lm":
        card.update(library_name="transformers", pipeline_tag="text-generation")
    return card


def _done(rep, pattern, out) -> None:
    console.print(f"[green]pruned[/] {len(rep.layers)} layers to {rep.sparsity:.2%} ({rep.method}, "
                  f"{rep.allocation}{', ' + pattern if pattern else ''}) in {rep.seconds:.1f} s -> {out}")
    console.print(rep.note)


def _load(kind, src, ck, eval_data, eval_tokens, no_eval, dtype=None):
    from ..io.refs import load_text

    if kind == "zoo-mlp":
        from ..zoo import MLP, accuracy, load_dataset

        data = load_dataset((ck.config or {}).get("dataset", "digits"))
        sd = ck.state_dict()
        hidden = tuple(sd[k].shape[0] for k in sd if k.endswith("weight"))[:-1]
        model = MLP(data.num_features, hidden, data.num_classes)
        model.load_state_dict(sd)
        return model.eval(), None, None if no_eval else (
            lambda m: {"accuracy": round(accuracy(m, data.x_test, data.y_test), 4)})
    if kind == "causal-lm":
        from ..engine.evaluate import perplexity
        from ..io.hf import load_causal_lm

        model, tok = load_causal_lm(src, **({'dtype': dtype} if dtype else {}))
        text = None if no_eval else load_text(eval_data, "heldout")

        def ev(m):
            r = perplexity(m, tok, text, max_tokens=eval_tokens)
            return {"perplexity": round(r["perplexity"], 3), "tokens": r["tokens"]}

        return model, tok, None if no_eval else ev
    from ..engine.evaluate import embedding_similarity
    from ..io.hf import load_encoder

    model, tok = load_encoder(src, **({'dtype': dtype} if dtype else {}))
    dense = copy.deepcopy(model)
    sentences = _sentences(load_text(eval_data, "heldout")) if not no_eval else []
    return model, tok, None if no_eval else (lambda m: embedding_similarity(m, dense, tok, sentences))
