"""Demo sections, one per capability; each returns (result dict, markdown text)."""
from __future__ import annotations

from ..io.describe import describe
from ..engine.evaluate import perplexity
from ..engine.streaming import write_source
from ..io.provenance import Provenance
from ..io.reader import open_checkpoint
from ..registry import get_method
from .adapt_section import adapt_section
from .data_section import data_section
from .inspect_section import inspect_section
from .quantize_section import quantize_section


def structure(ctx):
    d = describe(ctx.model_path)
    d.pop("tensors")
    cfg = d["config"]
    text = (f"{d['architecture']}: {d['num_parameters']:,} parameters in {d['num_tensors']} tensors "
            f"({', '.join(d['dtypes'])}), {cfg.get('num_hidden_layers')} layers, hidden {cfg.get('hidden_size')}, "
            f"MLP {cfg.get('intermediate_size')}, {cfg.get('num_attention_heads')} heads "
            f"({cfg.get('num_key_value_heads')} KV), vocabulary {cfg.get('vocab_size')}.")
    return d, text


def dense_perplexity(ctx):
    model, tok = ctx.model_and_tokenizer()
    r = perplexity(model, tok, ctx.heldout(), max_tokens=ctx.eval_tokens)
    ctx.cache["dense_ppl"] = r["perplexity"]
    return r, (f"Held-out Wikipedia perplexity (fp32): **{r['perplexity']:.3f}** over {r['tokens']:,} tokens "
               f"({r['windows']} windows of {r['seqlen']}, {r['seconds']} s).")


def inspect_stats(ctx):
    spec = get_method("inspect", "stats")
    with open_checkpoint(ctx.model_path) as ck:
        rep = spec.fn(ck, spec.make_config({"top": 5}))
    s = rep["summary"]
    rows = "\n".join(f"| `{r['name']}` | {r['norm']:.2f} |" for r in s["largest_norm"])
    text = (f"`inspect/stats` read {s['tensors']} tensors one at a time; non-finite tensors: "
            f"{len(s['nonfinite_tensors'])}; share of exact zeros {s['zero_share']:.4%}.\n\n"
            f"| largest-norm tensor | Frobenius norm |\n|---|---|\n{rows}")
    return s, text


def cast_bf16(ctx):
    import torch

    from ..io.hf import load_causal_lm

    spec = get_method("compress", "cast")
    cfg = spec.make_config({"dtype": "bfloat16"})
    out = ctx.work / "smollm2-bf16"
    with open_checkpoint(ctx.model_path) as ck:
        src = spec.fn(ck, cfg)
        write_source(src, out, provenance=Provenance("compress/cast", cfg.model_dump(), [str(ctx.model_path)]),
                     inputs=[ctx.model_path])
    size_in = sum(f.stat().st_size for f in ctx.model_path.glob("*.safetensors"))
    size_out = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    model, tok = load_causal_lm(out, dtype=torch.float32)
    r = perplexity(model, tok, ctx.heldout(), max_tokens=ctx.eval_tokens)
    del model
    dense = ctx.cache.get("dense_ppl")
    res = {"size_in": size_in, "size_out": size_out, "perplexity": r["perplexity"], "dense_perplexity": dense}
    text = (f"`compress/cast` to bfloat16 streamed into `smollm2-bf16/` ({size_in / 2**20:.0f} MiB -> "
            f"{size_out / 2**20:.0f} MiB); it loads with transformers and scores perplexity "
            f"**{r['perplexity']:.3f}**" + (f" (fp32: {dense:.3f})." if dense else "."))
    return res, text




def merge_digits(ctx):
    """Merge methods on real models: digits MLPs fine-tuned from one init on class subsets."""
    import copy

    from .. import zoo
    from ..merge.api import merge
    from ..merge.soup import greedy_soup

    base, fts = zoo.digits_finetunes()
    data = zoo.digits()

    def acc(sd):
        m = copy.deepcopy(base)
        m.load_state_dict(sd)
        return zoo.accuracy(m, data.x_test, data.y_test)

    b, sds = base.state_dict(), [f.state_dict() for f in fts]
    rows = {"base (shared init)": acc(b)}
    rows.update({f"fine-tune {i} (classes {','.join(map(str, s))})": acc(sd)
                 for i, (sd, s) in enumerate(zip(sds, zoo.classifiers.DEFAULT_SUBSETS))})
    for label, method, params in (("uniform soup", "linear", {}), ("task arithmetic (lambda 0.5)",
                                  "task-arithmetic", {"lambda": 0.5}), ("TIES (density 0.2)", "ties", {"density": 0.2}),
                                  ("DARE (density 0.5)", "dare", {"density": 0.5}), ("TSV-M", "tsv-m", {})):
        rows[label] = acc(merge(method, sds, base=None if method == "linear" else b, show_progress=False, **params))
    soup = greedy_soup(sds, acc)
    rows[f"greedy soup (ingredients {soup.accepted})"] = soup.soup_score
    table = "\n".join(f"| {k} | {v:.3f} |" for k, v in rows.items())
    return rows, ("Digits MLPs fine-tuned from one init on different class subsets, merged with weightlab "
                  "(held-out accuracy, 450 test images):\n\n| model | accuracy |\n|---|---|\n" + table)


def prune_wanda(ctx):
    """Wanda 50% on SmolLM2 with the layer-by-layer engine; perplexity before and after."""
    import json

    from ..compress import prune
    from ..io.hf import load_causal_lm

    model, tok = load_causal_lm(ctx.model_path)
    rep = prune(model, "wanda", 0.5, calib="wiki", tokenizer=tok, nsamples=16, seqlen=512)
    r = perplexity(model, tok, ctx.heldout(), max_tokens=ctx.eval_tokens)
    del model
    dense = ctx.cache.get("dense_ppl")
    (ctx.work / "prune-report.json").write_text(json.dumps(rep.as_dict(), indent=1))
    res = {"method": "wanda", "sparsity": rep.sparsity, "perplexity": r["perplexity"], "dense_perplexity": dense,
           "prune_seconds": round(rep.seconds, 1)}
    text = (f"`compress/prune` with Wanda at 50% unstructured sparsity ({len(rep.layers)} linear layers in "
            f"{rep.seconds:.0f} s, 16 x 512 calibration tokens of the Wikipedia calibration split): "
            f"held-out perplexity **{r['perplexity']:.3f}**" + (f" (dense: {dense:.3f})." if dense else ".")
            + f" {rep.note}")
    return res, text


SECTIONS = [
    ("structure", structure),
    ("perplexity", dense_perplexity),
    ("inspect", inspect_stats),
    ("compress: cast", cast_bf16),
    ("inspect: spectral", inspect_section),
    ("merge", merge_digits),
    ("compress: prune", prune_wanda),
    ("compress: quantize + EoRA", quantize_section),
    ("adapt", adapt_section),
    ("data", data_section),
]
